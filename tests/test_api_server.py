"""The OpenAI API the clients send (issue 14), on the real SmolLM2 through the server.

Logprobs: chat `logprobs`/`top_logprobs`, completions `logprobs: k` (streamed and not) and
`echo` with the prompt's logprobs, against a log-softmax of transformers' logits on the same
GGUF. Then `n` choices and their seeds, sampling controls through the API, and vLLM's
/tokenize, /detokenize and /v1/models.

Tolerance: 1e-3 in logprob (the issue's). Our logits match transformers' within 3e-5 of their
range (tests/test_reference.py), i.e. about 1.5e-3 absolute on a range of ~47, and a logprob
is a logit minus a logsumexp, so in practice the difference is far smaller (measured below
1e-4); the top-k check asks only that every returned token's logprob is right and that no
token outside them beats the k-th by more than the tolerance (never the order of near-ties).
"""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from jaxinfer.serving import EngineConfig
from jaxinfer.serving.engine import Engine
from jaxinfer.serving.server import ServerState
from tests.test_serving import MODEL, serving

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

TOLERANCE = 1e-3
# 384 tokens of context: a tools preamble (tool calling) takes ~200 tokens of the prompt.
CONFIG = EngineConfig(max_batch_size=8, max_seq_len=384, page_size=16, num_pages=8 * 24 + 1,
                      decode_steps=4, max_queue_size=32)


@pytest.fixture(scope="module")
def url(smollm2):
    state = ServerState(MODEL)
    with serving(state) as url:
        engine = Engine(smollm2, CONFIG)
        engine.warmup()
        state.attach(engine)
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def reference_logprobs(hf_smollm2, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab]: transformers' log-softmax after each prefix ids[: i + 1]."""
    with torch.no_grad():
        logits = hf_smollm2(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def token_id(spelled: str) -> int:
    assert spelled.startswith("token_id:"), spelled
    return int(spelled.removeprefix("token_id:"))


def check_top(top: list[tuple[int, float]], reference: np.ndarray, k: int) -> None:
    """`top` (id, logprob) pairs are the k most likely under `reference` [vocab]."""
    assert len(top) == k
    ids = [t for t, _ in top]
    np.testing.assert_allclose([lp for _, lp in top], reference[ids], atol=TOLERANCE)
    others = np.delete(reference, ids)
    assert others.max() <= min(lp for _, lp in top) + TOLERANCE


def check_generated(hf_smollm2, prompt_ids: list[int], entries, k: int) -> None:
    """entries: (chosen id, logprob, top pairs) per generated token, after `prompt_ids`."""
    generated = [t for t, _, _ in entries]
    reference = reference_logprobs(hf_smollm2, prompt_ids + generated)
    for i, (token, logprob, top) in enumerate(entries):
        row = reference[len(prompt_ids) - 1 + i]  # the logits that chose token i
        assert abs(logprob - row[token]) <= TOLERANCE, (i, logprob, row[token])
        check_top(top, row, k)


def chat_entries(content: list) -> list:
    return [(token_id(c.token), c.logprob, [(token_id(t.token), t.logprob)
                                            for t in c.top_logprobs]) for c in content]


MESSAGES = [{"role": "user", "content": "Name two planets of the solar system."}]


def chat_prompt_ids(smollm2) -> list[int]:
    tokenizer = smollm2.tokenizer
    return tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True),
                            add_bos=False)


@pytest.mark.numerics
def test_chat_logprobs_equal_transformers_log_softmax(client, smollm2, hf_smollm2):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=5, extra_body={"return_tokens_as_token_ids": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    check_generated(hf_smollm2, chat_prompt_ids(smollm2), chat_entries(content), 5)


@pytest.mark.numerics
def test_streamed_chat_logprobs_equal_the_whole_answers(client, smollm2, hf_smollm2):
    options = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                   top_logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    content = []
    for chunk in client.chat.completions.create(**options, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            content += chunk.choices[0].logprobs.content
    assert len(content) == 8
    check_generated(hf_smollm2, chat_prompt_ids(smollm2), chat_entries(content), 3)


def test_chat_logprobs_without_top_logprobs_give_an_empty_top_list(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                           temperature=0, logprobs=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == 3 and all(c.top_logprobs == [] for c in content)
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert all(c.logprob <= 0 for c in content)


def completion_entries(logprobs: dict) -> list:
    """The legacy logprobs object (spelled as ids) -> (id, logprob, top pairs); the chosen
    token is in every top dict, as in vLLM: the k best are the k largest of the others."""
    entries = []
    for spelled, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                     logprobs["top_logprobs"], strict=True):
        pairs = sorted(((token_id(t), lp) for t, lp in (top or {}).items()), key=lambda p: -p[1])
        entries.append((token_id(spelled), logprob, pairs))
    return entries


PROMPT = "The three primary colors are"


@pytest.mark.numerics
@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_k_equal_transformers_log_softmax(url, smollm2, hf_smollm2, stream):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "logprobs": 4, "return_tokens_as_token_ids": True, "stream": stream}
    if stream:
        merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    for key in merged if choice["logprobs"] else ():
                        merged[key] += choice["logprobs"][key]
    else:
        merged = httpx.post(f"{url}/v1/completions", json=body,
                            timeout=120).json()["choices"][0]["logprobs"]
    entries = completion_entries(merged)
    assert len(entries) == 6
    chosen_in_top = all(token in dict(top) for token, _, top in entries)
    assert chosen_in_top
    prompt_ids = smollm2.tokenizer.encode(PROMPT)
    reference = reference_logprobs(hf_smollm2, prompt_ids + [t for t, _, _ in entries])
    for i, (token, logprob, top) in enumerate(entries):
        row = reference[len(prompt_ids) - 1 + i]
        assert abs(logprob - row[token]) <= TOLERANCE
        np.testing.assert_allclose([lp for _, lp in top], row[[t for t, _ in top]],
                                   atol=TOLERANCE)
        assert len(top) in (4, 5) and np.sort(row)[-4] <= top[3][1] + TOLERANCE


@pytest.mark.numerics
def test_echo_returns_the_prompt_and_its_logprobs(url, smollm2, hf_smollm2):
    """What lm-evaluation-harness's loglikelihood requests send: echo, logprobs, 1 token."""
    prompt_ids = smollm2.tokenizer.encode(PROMPT)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
            "logprobs": 2, "echo": True}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    assert choice["text"].startswith(PROMPT)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt_ids) + 1
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][:3] == [0, len(logprobs["tokens"][0]),
                                           len(logprobs["tokens"][0] + logprobs["tokens"][1])]
    reference = reference_logprobs(hf_smollm2, prompt_ids)
    want = reference[np.arange(len(prompt_ids) - 1), prompt_ids[1:]]
    np.testing.assert_allclose(logprobs["token_logprobs"][1 : len(prompt_ids)], want,
                               atol=TOLERANCE)


@pytest.mark.parametrize(("path", "field", "value"), [
    ("chat/completions", "top_logprobs", 21),
    ("chat/completions", "top_logprobs", -1),
    ("completions", "logprobs", 21),
])
def test_logprob_counts_out_of_range_get_a_400_naming_the_field(url, path, field, value):
    body = {"model": MODEL, "max_tokens": 1, field: value}
    body |= {"messages": MESSAGES, "logprobs": True} if path.startswith("chat") else {
        "prompt": "hi"}
    response = httpx.post(f"{url}/v1/{path}", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_top_logprobs_without_logprobs_is_refused(url):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "top_logprobs": 2}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "only allowed with logprobs" in response.json()["error"]["message"]


# -- n, seeds and sampling controls -----------------------------------------------------------


def test_n_choices_are_reproducible_and_each_equals_its_seed_offset_alone(client):
    """Choice i of a request with seed s samples as a single request with seed s + i."""
    options = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=1.0)
    reply = client.completions.create(**options, n=4, seed=7)
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(reply.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert reply.usage.completion_tokens == 40
    again = client.completions.create(**options, n=4, seed=7)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    alone = [client.completions.create(**options, seed=7 + i).choices[0].text for i in range(4)]
    assert alone == texts
    assert len(set(texts)) > 1  # different seeds: (almost surely) different samples


def test_streamed_n_choices_join_to_the_whole_ones(client):
    options = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=3, n=3)
    whole = client.chat.completions.create(**options)
    parts = {}
    for chunk in client.chat.completions.create(**options, stream=True):
        for choice in chunk.choices:
            parts[choice.index] = parts.get(choice.index, "") + (choice.delta.content or "")
    assert parts == {c.index: c.message.content for c in whole.choices}


def test_logit_bias_forces_a_token_and_min_tokens_holds_off_the_stop(client, smollm2):
    token = smollm2.tokenizer.encode(" banana")[0]
    reply = client.completions.create(model=MODEL, prompt="I like", max_tokens=5, temperature=0,
                                      logit_bias={str(token): 100})
    assert reply.choices[0].text == smollm2.tokenizer.decode([token] * 5)
    eos = smollm2.tokenizer.stop_ids[0]
    stopped = client.completions.create(model=MODEL, prompt="I like", max_tokens=8,
                                        temperature=0, logit_bias={str(eos): 100})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(model=MODEL, prompt="I like", max_tokens=8, temperature=0,
                                     logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"
    ignored = client.completions.create(model=MODEL, prompt="I like", max_tokens=5,
                                        temperature=0, logit_bias={str(eos): 100},
                                        extra_body={"ignore_eos": True})
    assert ignored.usage.completion_tokens == 5 and ignored.choices[0].finish_reason == "length"


def test_frequency_penalty_changes_a_repetitive_greedy_answer(client):
    options = dict(model=MODEL, prompt="1, 1, 1, 1, 1, 1, 1,", max_tokens=12, temperature=0)
    plain = client.completions.create(**options).choices[0].text
    penalized = client.completions.create(**options, frequency_penalty=2.0).choices[0].text
    assert plain.count("1") > penalized.count("1")


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0),
    ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {"99999999": 1}),
    ("min_tokens", -1), ("n", 0), ("n", 17), ("ignore_eos", "yes"),
])
def test_sampling_controls_out_of_range_get_a_400_naming_the_field(url, field, value):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error


# -- tokenizer endpoints and the model list ---------------------------------------------------


def test_tokenize_and_detokenize_round_trip_in_vllms_shapes(url, smollm2):
    tokenizer = smollm2.tokenizer
    answer = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": PROMPT,
                                                 "return_token_strs": True}).json()
    assert answer["tokens"] == tokenizer.encode(PROMPT)
    assert answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == CONFIG.max_seq_len
    assert answer["token_strs"] == [tokenizer.token_text(t) for t in answer["tokens"]]
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": answer["tokens"]})
    assert back.json() == {"prompt": tokenizer.decode(answer["tokens"])}
    chat = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == chat_prompt_ids(smollm2)


@pytest.mark.parametrize(("path", "body"), [
    ("tokenize", {"prompt": "hi", "messages": MESSAGES}),
    ("tokenize", {}),
    ("tokenize", {"prompt": "hi", "model": "other"}),
    ("detokenize", {"tokens": [10**8]}),
    ("detokenize", {"tokens": ["a"]}),
])
def test_bad_tokenizer_requests_get_a_4xx(url, path, body):
    response = httpx.post(f"{url}/{path}", json=body)
    assert 400 <= response.status_code < 500 and response.json()["error"]["message"]


def test_models_lists_max_model_len(client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == CONFIG.max_seq_len


# -- structured output ------------------------------------------------------------------------

PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "kind": {"enum": ["cat", "dog", "bird", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "verified": {"type": "boolean"}},
            "required": ["city", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "kind", "tags", "owner"],
    "additionalProperties": False,
}
PETS = ["a cat", "an old dog", "a parrot", "a goldfish", "a kitten", "a puppy", "a hamster",
        "a canary", "a shy cat", "a loud dog", "a tiny fish", "a clever crow", "a lazy cat",
        "a police dog", "a blue budgie", "a koi", "a stray cat", "a sheepdog", "an owl",
        "a betta fish"]


def pet_request(pet: str) -> dict:
    return dict(model=MODEL, max_tokens=90, temperature=0,
                messages=[{"role": "user", "content": f"Describe {pet} as JSON."}],
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "pet", "schema": PET_SCHEMA,
                                                 "strict": True}})


def test_json_schema_output_validates_on_20_prompts_streamed_and_not(url, client):
    """20 constrained chats at once, half streamed, beside 4 unconstrained greedy requests
    that must give the text they give alone."""
    jsonschema = pytest.importorskip("jsonschema")
    free = [dict(model=MODEL, prompt=p, max_tokens=12, temperature=0)
            for p in ("The capital of France is", "def fibonacci(n):", "List three colors:",
                      "1, 2, 3, 4, 5,")]
    alone = [client.completions.create(**f).choices[0].text for f in free]

    def constrained(i: int) -> tuple[str, str]:
        request = pet_request(PETS[i])
        if i % 2:
            chunks = client.chat.completions.create(**request, stream=True)
            text, reason = "", None
            for chunk in chunks:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
            return text, reason
        reply = client.chat.completions.create(**request)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(constrained, range(len(PETS))))
        beside = list(pool.map(lambda f: client.completions.create(**f).choices[0].text, free))
    for text, reason in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PET_SCHEMA)
    assert beside == alone
    assert len({text for text, _ in answers}) > 5  # the prompts steer the content


def test_json_object_regex_and_choice_constraints_hold(client):
    copy = [{"role": "user", "content": 'Repeat this JSON object: {"planet": "Mars", "moons": 2}'}]
    reply = client.chat.completions.create(model=MODEL, messages=copy, max_tokens=60,
                                           temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    phone = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20,
                                      temperature=0,
                                      extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", phone.choices[0].text)
    for seed in range(4):
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
            max_tokens=10, temperature=1.0, seed=seed,
            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
        assert answer.choices[0].message.content in ("yes", "no", "maybe")


@pytest.mark.parametrize(("field", "value", "words"), [
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}},
     "objectx"),
    ("guided_regex", "a(b", "unclosed group"),
    ("guided_grammar", "start: undefined_rule", "undefined_rule"),
    ("response_format", {"type": "json_schema"}, "json_schema"),
])
def test_a_constraint_the_library_refuses_is_a_400_naming_the_problem(url, field, value, words):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"], error


def test_two_constraints_at_once_are_refused(url):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "guided_regex": "a",
            "guided_choice": ["a"]}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and "at most one" in response.json()["error"]["message"]


# -- tool calling -----------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object",
                                       "properties": {"zone": {"type": "string",
                                                               "maxLength": 10}},
                                       "required": ["zone"], "additionalProperties": False}}}
QUESTIONS = ["What is the weather in Paris?", "Is it raining in Tokyo?",
             "What time is it in London?", "How hot is it in Cairo today?"]


def test_tool_choice_required_always_yields_parseable_arguments(client):
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"]
               for t in (WEATHER_TOOL, TIME_TOOL)}
    for question in QUESTIONS:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=60,
            temperature=0, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_named_tool_choice_calls_that_function_streamed_as_deltas(client):
    options = dict(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}],
                   max_tokens=60, temperature=0, tools=[WEATHER_TOOL, TIME_TOOL],
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**options).choices[0].message.tool_calls[0]
    assert whole.function.name == "get_time"
    name, arguments, reasons = "", "", []
    for chunk in client.chat.completions.create(**options, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
            reasons.append(choice.finish_reason)
    assert name == "get_time" and json.loads(arguments) == json.loads(whole.function.arguments)
    assert reasons[-1] == "tool_calls"


def test_auto_tool_choice_parses_a_call_or_answers_in_text(client):
    """With "auto" the model chooses; whatever it writes comes back as a parsed call (to an
    offered function, arguments parsing) or as plain content, never as both lost."""
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=40,
        temperature=0, tools=[WEATHER_TOOL])
    message = reply.choices[0].message
    if message.tool_calls:
        assert reply.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls[0].function.name == "get_weather"
        json.loads(message.tool_calls[0].function.arguments)
    else:
        assert message.content


def test_a_tool_result_conversation_renders_and_answers(client):
    messages = [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                           temperature=0, tools=[WEATHER_TOOL],
                                           tool_choice="none")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize(("choice", "words"), [
    ({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ("sometimes", "tool_choice"),
])
def test_a_bad_tool_choice_is_a_400(url, choice, words):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "tools": [WEATHER_TOOL],
            "tool_choice": choice}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and words in response.json()["error"]["message"]


# -- a third-party client, unchanged ----------------------------------------------------------


def test_langchain_chat_openai_invokes_streams_structures_and_binds_tools(url):
    """langchain-openai's ChatOpenAI, as a user points it at any OpenAI-compatible server."""
    langchain_openai = pytest.importorskip("langchain_openai")
    jsonschema = pytest.importorskip("jsonschema")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused",
                                      temperature=0, max_tokens=12, max_retries=0, timeout=120)
    answer = llm.invoke("Name a color.")
    assert answer.content and answer.response_metadata["finish_reason"] in ("stop", "length")
    assert "".join(chunk.content for chunk in llm.stream("Name a color.")) == answer.content

    pet = llm.model_copy(update={"max_tokens": 90}).with_structured_output(
        {"title": "pet", "description": "A pet", **PET_SCHEMA}, method="json_schema",
        strict=True)
    jsonschema.validate(pet.invoke("Describe a cat."), PET_SCHEMA)

    with_tools = llm.model_copy(update={"max_tokens": 60}).bind_tools([WEATHER_TOOL],
                                                                     tool_choice="required")
    (call,) = with_tools.invoke(QUESTIONS[0]).tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_TOOL["function"]["parameters"])
