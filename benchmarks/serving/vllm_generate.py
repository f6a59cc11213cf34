"""Runs inside the vLLM environment (benchmarks/serving/vllm_env.py): greedy generation of given prompt token ids by
vLLM's offline `LLM`, with or without a drafter, and vLLM's own speculative-decoding counters.

    <vllm env python> vllm_generate.py request.json result.json

request.json: {"target": path, "drafter": path | null, "method": "eagle3" | "eagle" | "speculators" | null,
"num_speculative_tokens": int, "prompts": [[ids]], "max_tokens": int, "settings": {…} (optional: more
speculative_config fields, e.g. P-EAGLE's "parallel_drafting": true)}. With "speculators" the drafter folder is served
on its own (`vllm serve <folder>`: the target comes from its speculators_config).
result.json: {"outputs": [[ids]], "spec": {num_drafts, num_draft_tokens, num_accepted_tokens,
accepted_per_position}}.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: nothing to spawn or clean up
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the toy target needs little


def spec_counters(llm) -> dict:
    names = {"vllm:spec_decode_num_drafts": "num_drafts", "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
             "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_position"}
    counters = {}
    for metric in llm.get_metrics():
        if metric.name in names:
            counters[names[metric.name]] = getattr(metric, "values", None) or getattr(metric, "value", None)
    return counters


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(open(sys.argv[1]).read())
    common = dict(dtype="float32", max_model_len=1024, enforce_eager=True, disable_log_stats=False, seed=0)
    tokens = request["num_speculative_tokens"]
    if request["method"] == "speculators":
        llm = LLM(model=request["drafter"], **common)
    elif request["drafter"]:
        speculative_config = {"method": request["method"], "model": request["drafter"], "num_speculative_tokens": tokens,
                              **request.get("settings", {})}
        llm = LLM(model=request["target"], speculative_config=speculative_config, **common)
    else:
        llm = LLM(model=request["target"], **common)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=request["max_tokens"]))
    outputs = [list(result.outputs[0].token_ids) for result in results]
    with open(sys.argv[2], "w") as handle:
        json.dump({"outputs": outputs, "spec": spec_counters(llm)}, handle)


if __name__ == "__main__":
    main()
