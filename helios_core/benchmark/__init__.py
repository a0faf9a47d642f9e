"""`helios bench`: Helios against its baselines under the same load and memory budget, in one run.

    workload.py   prompts from bench/data and arrival schedules (Poisson, closed loop)
    traces.py     what a client saw of each request, and the latency/throughput summary
    systems.py    the in-process systems (Helios, EE baseline, full depth, transformers generate)
    quality.py    teacher-forced quality of the configurations a system served with
    http.py       helios_serve: the Ray Serve app on a local cluster, driven over HTTP
    runner.py     one benchmark run: every system, same settings, results.json
    plots.py      PNG plots of a results.json
"""
