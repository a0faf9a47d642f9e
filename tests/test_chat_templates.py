"""Each model renders chats with its own template, and a template's BOS is not doubled by tokenization.

The ingress runs in process (its class, not a Serve deployment) over stand-in replica handles that
hand each prompt to a real in-process engine of their tiny model, so what is checked is the prompt
token ids that model's engine received.
"""

from __future__ import annotations

import asyncio

import pytest
import yaml

import tiny_models
from helios_core.engine import EngineConfig, LLMEngine, encode, load_tokenizer
from helios_core.sampling import SamplingParams

pytest.importorskip("ray")
from deployments import openai_protocol as oa  # noqa: E402
from deployments.ingress import Ingress  # noqa: E402

BOS = tiny_models.EOS_TOKEN  # the tiny tokenizer's bos (and eos)
# A template that emits the BOS itself (as Llama 3's and Gemma's do), on a tokenizer that adds it too.
WITH_BOS = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PLAIN = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }} {% endfor %}"
         "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
MESSAGES = [{"role": "user", "content": "def f(x):"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("templates")
    return {"bos": tiny_models.make_tiny_checkpoint("llama_gqa", root / "bos", num_layers=2, chat_template=WITH_BOS,
                                                    add_bos=True),
            "plain": tiny_models.make_tiny_checkpoint("llama_gqa", root / "plain", num_layers=2, chat_template=PLAIN)}


def test_a_template_that_emits_the_bos_gets_no_second_one(models):
    tokenizer = load_tokenizer(models["bos"])
    bos = tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith(BOS) and tokenizer(text).input_ids[:2] == [bos, bos]  # what plain encoding does
    engine = LLMEngine(EngineConfig(model=str(models["bos"]), dtype="float32", max_model_len=128))
    [out] = engine.generate([text], SamplingParams(max_tokens=1))
    assert out.prompt_token_ids == encode(tokenizer, text) == tokenizer(text).input_ids[1:]
    assert engine.tokenize("def f(x):")[0] == bos  # text without it still gets the tokenizer's BOS
    assert engine.tokenize("def f(x):").count(bos) == 1


class Replica:
    """A stand-in model replica handle: its engine takes the prompt; `moves` answers a routed request
    with a switch to that model instead (the first time), as a replica does after a switch."""

    def __init__(self, path, moves: str | None = None):
        self.engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_model_len=128))
        self.moves, self.received = moves, []

    def options(self, stream: bool):
        return self

    @property
    def generate(self):
        return self

    def remote(self, prompt, params, task, routed):
        async def items():
            if routed and self.moves:
                moved, self.moves = self.moves, None
                yield {"moved": moved}
                return
            [out] = self.engine.generate([prompt], params)
            self.received.append(out.prompt_token_ids)
            yield {"text": out.text, "token_ids": out.token_ids, "finished": True}
        return items()


class Router:
    def __init__(self, default: str):
        self.table = {"default": default, "tasks": {}, "profile": None}

    @property
    def routing_table(self):
        return self

    async def remote(self):
        return self.table


def chat(ingress, model: str) -> None:
    """A chat request through the ingress's own steps: choose the model and render, then stream."""
    req = oa.validate_chat({"model": model, "messages": MESSAGES, "max_tokens": 1}, 16,
                           models=["helios", "bos", "plain"])

    async def run():
        await ingress._stream(*await ingress._call(req, chat=True))
    asyncio.run(run())


def test_each_model_renders_with_its_own_template_also_after_a_switch(models, tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [{"name": n, "path": str(path)} for n, path in models.items()]}))
    replicas = {"bos": Replica(models["bos"], moves="plain"), "plain": Replica(models["plain"])}
    user_class = Ingress.func_or_class.__bases__[0]  # the class under Serve's ASGI wrapper
    ingress = user_class(Router(default="bos"), replicas, str(registry), max_model_len=128)
    tokenizers = {name: load_tokenizer(path) for name, path in models.items()}
    texts = {name: t.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
             for name, t in tokenizers.items()}
    assert texts == {"bos": f"{BOS}<user>def f(x):\n<assistant>", "plain": "[USER] def f(x): [ASSISTANT]"}
    expected = {"bos": tokenizers["bos"](texts["bos"]).input_ids[1:],  # the template's BOS, no second one
                "plain": tokenizers["plain"](texts["plain"]).input_ids}

    chat(ingress, "bos")  # pinned: never moved
    chat(ingress, "plain")
    assert replicas["bos"].received == [expected["bos"]] and replicas["plain"].received == [expected["plain"]]
    chat(ingress, "helios")  # routed to bos, which hands it over to plain before it starts
    assert replicas["bos"].received == [expected["bos"]]
    assert replicas["plain"].received == [expected["plain"]] * 2  # rendered again with plain's template
