"""A stand-in chat-completions server that answers the rubric from text statistics.

For demos and benchmarks without an LLM: `samplemix annotate` talks to it exactly as to
a real endpoint. Its labels are NOT an LLM's judgement; they are this documented
function of the heuristic scorer's rule pass values (samplemix/scoring/quality.py, each in
[0, 1]) and of simple counts:

    clarity      = 1 if mean(uppercase, digit_punct, symbol_ratio) >= 0.9
    coherence    = 1 if duplicate_lines >= 0.9 and ellipsis_lines >= 0.9
    structure    = 1 if bullet_lines >= 0.9 and mean_word_length >= 0.9
    accuracy     = 1 if alpha_words >= 0.9
    significance = 1 if word_count >= 0.9
    knowledge    = 0 / 1 / 2 for < 150 / < 600 / >= 600 words
    logic        = 0 / 1 / 2 for < 4 / < 9 / >= 9 stop words per 100 words

    python examples/rubric_server.py --port 8765   # then --endpoint http://127.0.0.1:8765/v1
"""

from __future__ import annotations

import argparse
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from samplemix.scoring.heuristic import STOP_WORDS, rule_scores

DOCUMENT = re.compile(r"<document>\n?(.*?)\n?</document>", re.S)


def rubric(text: str) -> dict[str, int]:
    """The seven rubric scores of ``text`` (see the module docstring)."""
    r = rule_scores(text)
    words = text.split()
    stops = sum(w.strip(".,;:!?\"'()").lower() in STOP_WORDS for w in words)
    per_100 = 100 * stops / max(len(words), 1)
    return {
        "clarity": int((r["uppercase"] + r["digit_punct"] + r["symbol_ratio"]) / 3 >= 0.9),
        "coherence": int(r["duplicate_lines"] >= 0.9 and r["ellipsis_lines"] >= 0.9),
        "structure": int(r["bullet_lines"] >= 0.9 and r["mean_word_length"] >= 0.9),
        "accuracy": int(r["alpha_words"] >= 0.9),
        "significance": int(r["word_count"] >= 0.9),
        "knowledge": 0 if len(words) < 150 else 1 if len(words) < 600 else 2,
        "logic": 0 if per_100 < 4 else 1 if per_100 < 9 else 2,
    }


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        found = DOCUMENT.search(prompt)
        content = json.dumps(rubric(found.group(1) if found else prompt))
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    port = parser.parse_args().port
    print(f"rubric stand-in on http://127.0.0.1:{port}/v1", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
