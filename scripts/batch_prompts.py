"""Answer a file of plain prompts (one per line, local or gs://) with a batch job and write
{"prompt", "completion"} lines back next to it.

  python scripts/batch_prompts.py                                   # a few built-in prompts, in a temp dir
  python scripts/batch_prompts.py gs://bucket/prompts.txt gs://bucket/answers.jsonl --max-tokens 128 \\
      -- --max-num-seqs 128                                          # flags after -- go to run_batch

The prompts become OpenAI batch lines (chat requests), `jaxllm.run_batch` runs them (resumable: run the
same command again after a kill), and the answers are joined back to their prompts by custom_id.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import fsspec

from jaxllm import run_batch

EXAMPLES = ["What is the capital of France?", "Give me a synonym of 'fast'.", "What is 12 times 12?"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompts", nargs="?", help="text file of prompts, one per line (default: built-in examples)")
    p.add_argument("answers", nargs="?", help="where the JSONL answers go (default: next to the batch files)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args(argv)

    work = (args.answers + ".batch") if args.answers else tempfile.mkdtemp(prefix="jaxllm-prompts-")
    answers = args.answers or os.path.join(work, "answers.jsonl")
    if args.prompts:
        with fsspec.open(args.prompts, "rt") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = EXAMPLES
    requests, results = f"{work}/requests.jsonl", f"{work}/results.jsonl"
    if "://" not in work:
        os.makedirs(work, exist_ok=True)  # object stores have no directories to make
    with fsspec.open(requests, "wt") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                                "body": {"messages": [{"role": "user", "content": prompt}],
                                         "max_tokens": args.max_tokens, "temperature": args.temperature}}) + "\n")
    code = run_batch.main(["-i", requests, "-o", results, *extra])
    if code:
        return code
    with fsspec.open(results, "rt") as f, fsspec.open(answers, "wt") as out:
        for line in f:
            rec = json.loads(line)
            body = rec["response"]["body"]
            answer = (body["choices"][0]["message"]["content"] if rec["response"]["status_code"] == 200
                      else {"error": body["error"]["message"]})
            out.write(json.dumps({"prompt": prompts[int(rec["custom_id"])], "completion": answer}) + "\n")
    print(f"answers: {answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
