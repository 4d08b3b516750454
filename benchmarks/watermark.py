"""The green-list watermark on the real SmolLM2: detection and perplexity cost (issue 18).

    python benchmarks/watermark.py --texts 50 --tokens 200 --out benchmarks/results/watermark.json

--texts chat prompts (one topic each) are answered twice through generate(), in calls of
--batch rows: once watermarked (jaxinfer.watermark, key KEY) and once not, both sampled at
temperature 1 with the same seeds, the end-of-turn ignored so every text has --tokens tokens.
Human text: paragraphs of Python's own documentation (docstrings of stdlib modules, cut to
--tokens tokens). Each text is scored by jaxinfer.watermark.detect twice: on the generated
token ids, and on its text tokenized again (what the detector CLI and endpoint see).
Acceptance (the issue's): z > 4 for every watermarked text, z < 2 for every other one.
Perplexity cost: the mean NLL per token of each set under the model without the watermark
(prompt included as context), and exp of it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import time

import jax
import numpy as np

import jaxinfer
from jaxinfer import watermark
from jaxinfer.checkpoints import sources
from jaxinfer.decode import prompt_logprobs
from jaxinfer.sampling import SamplingParams

KEY = "benchmark watermark key"
TOPICS = [
    "the ocean", "volcanoes", "the history of bread", "honeybees", "the moon landing",
    "rainforests", "chess", "the printing press", "jazz music", "deserts", "the human heart",
    "electric cars", "ancient Rome", "the water cycle", "photosynthesis", "coffee",
    "the Great Wall of China", "octopuses", "mountain climbing", "the internet", "glaciers",
    "the Olympic Games", "owls", "recycling", "the Renaissance", "black holes", "tea",
    "the piano", "earthquakes", "dinosaurs", "lighthouses", "the solar system", "bicycles",
    "penguins", "the Silk Road", "vaccines", "origami", "thunderstorms", "libraries",
    "the violin", "wolves", "the steam engine", "coral reefs", "chocolate", "the Sahara",
    "submarines", "gardening", "the Eiffel Tower", "hurricanes", "elephants",
]
STDLIB = ["argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
          "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "html",
          "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib",
          "pickle", "pprint", "random", "re", "shutil", "socket", "sqlite3", "statistics",
          "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
          "typing", "unittest", "urllib.parse", "uuid", "weakref", "zipfile", "zlib",
          "xml.dom.minidom", "sched", "queue", "bisect", "calendar", "codecs", "ftplib",
          "optparse", "smtplib", "struct", "trace", "turtle", "wave", "shelve", "gzip"]


def human_texts(tokenizer, count: int, tokens: int) -> list[list[int]]:
    """Docstrings of stdlib modules and their public classes/functions, `tokens` long each."""
    out: list[list[int]] = []
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [module.__doc__] + [inspect.getdoc(obj) for _, obj in inspect.getmembers(module)
                                   if (inspect.isclass(obj) or inspect.isfunction(obj))
                                   and getattr(obj, "__module__", "") == name]
        for doc in docs:
            ids = tokenizer.encode(doc or "", add_bos=False)
            if len(ids) >= tokens:
                out.append(ids[:tokens])
                break  # one text per module, so the set is varied
        if len(out) == count:
            break
    return out


def mean_nll(model, prompts: list[list[int]], texts: list[list[int]]) -> float:
    """Mean negative log-likelihood per token of `texts` after `prompts`, unwatermarked."""
    logprobs = jax.jit(prompt_logprobs, static_argnames="cfg")
    total, n = 0.0, 0
    for start in range(0, len(texts), 10):
        rows = [p + t for p, t in zip(prompts[start:start + 10], texts[start:start + 10],
                                      strict=True)]
        width = max(map(len, rows))
        batch = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            batch[i, :len(row)] = row
        chosen = np.asarray(logprobs(model.params, batch, cfg=model.config).chosen)
        for i, (p, t) in enumerate(zip(prompts[start:start + 10], texts[start:start + 10],
                                       strict=True)):
            total -= chosen[i, len(p) - 1:len(p) - 1 + len(t)].sum()  # logprob of t under p
            n += len(t)
    return float(total / n)


def scores(model, prompts, texts, key: str) -> dict:
    """z on the token ids (with the prompt's last token as the first context) and on the
    decoded text tokenized again."""
    on_ids = [float(watermark.detect(p[-1:] + t, key)[0])
              for p, t in zip(prompts, texts, strict=True)]
    retokenized = [model.tokenizer.encode(model.tokenizer.decode(t), add_bos=False)
                   for t in texts]
    on_text = [float(watermark.detect(t, key)[0]) for t in retokenized]
    return {"z_ids": on_ids, "z_text": on_text}


def summary(z: list[float]) -> str:
    return f"min {min(z):6.2f}  median {np.median(z):6.2f}  max {max(z):6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()

    model = jaxinfer.load_model(str(sources.resolve(sources.DEFAULT_MODEL)), dtype="float32",
                                progress=False)
    tokenizer = model.tokenizer
    topics = (TOPICS * (args.texts // len(TOPICS) + 1))[:args.texts]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write a short essay about {topic}."}],
        add_generation_prompt=True), add_bos=False) for topic in topics]

    texts, seconds = {}, {}
    for name, key in (("watermarked", KEY), ("plain", None)):
        start, texts[name] = time.perf_counter(), []
        for i in range(0, args.texts, args.batch):
            sampling = [SamplingParams(temperature=args.temperature, seed=j, ignore_eos=True,
                                       watermark_key=key)
                        for j in range(i, min(i + args.batch, args.texts))]
            result = jaxinfer.generate(model.params, prompts[i:i + args.batch], model.config,
                                       max_new_tokens=args.tokens, sampling=sampling)
            texts[name] += result.tokens
        seconds[name] = time.perf_counter() - start
    human = human_texts(tokenizer, args.texts, args.tokens)

    marked = scores(model, prompts, texts["watermarked"], KEY)
    plain = scores(model, prompts, texts["plain"], KEY)
    wrong_key = scores(model, prompts, texts["watermarked"], "some other key")
    human_z = [float(watermark.detect(t, KEY)[0]) for t in human]
    nll = {name: float(mean_nll(model, prompts, texts[name])) for name in texts}
    report = {
        "texts": args.texts, "tokens": args.tokens, "temperature": args.temperature,
        "gamma": watermark.GAMMA, "delta": watermark.DELTA, "human_texts": len(human),
        "watermarked": marked, "plain": plain, "watermarked_wrong_key": wrong_key,
        "human": human_z, "nll": nll, "perplexity": {k: float(np.exp(v)) for k, v in nll.items()},
        "generate_seconds": seconds, "load_average": os.getloadavg(),
    }
    checks = {
        "watermarked z_text > 4": min(marked["z_text"]) > 4,
        "watermarked z_ids > 4": min(marked["z_ids"]) > 4,
        "plain z_text < 2": max(plain["z_text"]) < 2,
        "human z < 2": max(human_z) < 2,
        "wrong key z_text < 2": max(wrong_key["z_text"]) < 2,
    }
    report["checks"] = checks
    print(f"{args.texts} texts of {args.tokens} tokens, gamma {watermark.GAMMA}, "
          f"delta {watermark.DELTA}, temperature {args.temperature}")
    for name, z in [("watermarked (ids)", marked["z_ids"]), ("watermarked (text)",
                    marked["z_text"]), ("plain (text)", plain["z_text"]),
                    ("wrong key (text)", wrong_key["z_text"]),
                    (f"human ({len(human)} docstrings)", human_z)]:
        print(f"  {name:28s} z {summary(z)}")
    print(f"  mean NLL/token under the plain model: watermarked {nll['watermarked']:.3f} "
          f"(ppl {np.exp(nll['watermarked']):.2f}), plain {nll['plain']:.3f} "
          f"(ppl {np.exp(nll['plain']):.2f})")
    print(f"  generate: watermarked {seconds['watermarked']:.1f}s, plain {seconds['plain']:.1f}s"
          f" (load average {os.getloadavg()[0]:.1f})")
    for check, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {check}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
