"""The API judge (`api:MODEL@URL`) against a misbehaving server of the test's own on 127.0.0.1: malformed JSON,
an HTTP 200 carrying {"error": ...}, a hung server, HTTP 500s and 401/403 answers are retried (or not) a
bounded number of times, then end in an error that names the URL and quotes the server's message (never an
echoed API key); timeout and retries reach the judge from load_reward; Ollama-style model names (with
colons) parse. Every judge here has a sub-second timeout and a 10 ms back-off: the file runs in seconds."""
import http.server
import json
import math
import threading
import time

import pytest
import torch

import rewards

KEY = "sk-test-echo-0123456789"


class Server:
    """A chat-completions server on 127.0.0.1 whose every answer is `reply(handler, body) -> (status, bytes)`,
    or, with hang=True, no answer at all (until close). Records every request it receives."""

    def __init__(self, reply=None, hang=False):
        self.requests, self.release = [], threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                try:
                    raw = self.rfile.read(int(self.headers["Content-Length"]))
                    server.requests.append((self.path, dict(self.headers), json.loads(raw)))
                    if hang:
                        server.release.wait(10)  # the client gives up long before
                        return
                    status, data = reply(self, server.requests[-1][2])
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client hung up (a timed-out request)
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(p_yes=0.75):
    def reply(handler, body):
        top = [{"token": "Yes", "logprob": math.log(p_yes)}, {"token": "No", "logprob": math.log(1 - p_yes)}]
        choice = {"index": 0, "message": {"role": "assistant", "content": "Yes"},
                  "logprobs": {"content": [{"token": "Yes", "logprob": top[0]["logprob"], "top_logprobs": top}]}}
        return 200, json.dumps({"model": body["model"], "choices": [choice]}).encode()
    return reply


def constant(status, data):
    return lambda handler, body: (status, data)


def judge_for(url, retries=2, timeout=0.5, **kw):
    return rewards.APIJudge(url, "m", timeout=timeout, retries=retries, backoff=0.01, workers=1, **kw)


def one_video():
    return torch.rand(1, 4, 3, 8, 8), ["a red square falling"]


def test_malformed_json_is_retried_then_quoted_with_the_url():
    with Server(constant(200, b"<html>502 Bad Gateway (proxy)</html>")) as srv:
        with pytest.raises(RuntimeError) as e:
            judge_for(srv.url, retries=2)(*one_video())
        assert len(srv.requests) == 3  # the first try and 2 retries, no more
    msg = str(e.value)
    assert f"{srv.url}/chat/completions" in msg and "502 Bad Gateway (proxy)" in msg and "JSON" in msg, msg


def test_an_error_object_in_a_200_is_retried_then_quoted():
    body = json.dumps({"error": {"message": "The model `m` does not exist.", "code": 404}}).encode()
    with Server(constant(200, body)) as srv:
        with pytest.raises(RuntimeError) as e:
            judge_for(srv.url, retries=1)(*one_video())
        assert len(srv.requests) == 2
    msg = str(e.value)
    assert f"{srv.url}/chat/completions" in msg and "The model `m` does not exist." in msg, msg
    assert "KeyError" not in repr(e.value) and not isinstance(e.value, KeyError)


def test_a_hung_server_times_out_per_try_and_says_so(capsys):
    with Server(hang=True) as srv:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as e:
            judge_for(srv.url, retries=1, timeout=0.3)(*one_video())
        elapsed = time.monotonic() - t0
        assert len(srv.requests) == 2
    assert elapsed < 3, elapsed  # 2 tries of 0.3 s (and a 10 ms back-off), not minutes
    msg = str(e.value)
    assert f"{srv.url}/chat/completions" in msg and "0.3 s" in msg and "start it" not in msg, msg
    err = capsys.readouterr().err  # each retry is announced: a slow failure is never silent
    assert "retry 1/1" in err and srv.url in err, err


def test_http_500s_quote_the_servers_message_and_do_not_say_unreachable():
    body = json.dumps({"error": {"message": "CUDA out of memory. Tried to allocate 2.00 GiB", "type": "InternalServerError"}})
    with Server(constant(500, body.encode())) as srv:
        with pytest.raises(RuntimeError) as e:
            judge_for(srv.url, retries=4)(*one_video())
        assert len(srv.requests) == 5
    msg = str(e.value)
    assert "HTTP 500" in msg and "CUDA out of memory. Tried to allocate 2.00 GiB" in msg and f"{srv.url}/chat/completions" in msg, msg
    assert "unreachable" not in msg and "start it" not in msg, msg


@pytest.mark.parametrize("status", [401, 403])
def test_unauthorized_never_echoes_the_reply(status, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    def echo(handler, body):  # a server that puts the key it got in its error message
        return status, json.dumps({"error": f"invalid key: {handler.headers['Authorization']}"}).encode()
    with Server(echo) as srv:
        with pytest.raises(RuntimeError) as e:
            judge_for(srv.url, retries=3)(*one_video())
        assert len(srv.requests) == 1  # not retried: the same key will not work the second time
        assert srv.requests[0][1]["Authorization"] == f"Bearer {KEY}"
    msg = str(e.value)
    assert "unauthorized: check OPENAI_API_KEY" in msg and f"HTTP {status}" in msg and srv.url in msg, msg
    assert KEY not in msg and "invalid key" not in msg, msg
    out = capsys.readouterr()
    assert KEY not in out.err and KEY not in out.out


def test_other_refusals_quote_the_reply_with_the_key_masked(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    def echo(handler, body):
        return 400, json.dumps({"error": {"message": f"bad request from {handler.headers['Authorization']}: "
                                                      f"image too large"}}).encode()
    with Server(echo) as srv:
        with pytest.raises(RuntimeError) as e:
            judge_for(srv.url, retries=3)(*one_video())
        assert len(srv.requests) == 1  # a 400 is the request's fault: not retried
    msg = str(e.value)
    assert "HTTP 400" in msg and "image too large" in msg and KEY not in msg, msg


def test_a_503_then_an_answer_still_scores():
    fails = [2]

    def flaky(handler, body):
        if fails[0]:
            fails[0] -= 1
            return 503, b'{"error": "loading model"}'
        return answer(0.75)(handler, body)
    with Server(flaky) as srv:
        out = judge_for(srv.url, retries=2)(*one_video())
        assert len(srv.requests) == 3
    assert out["p_yes"].tolist() == pytest.approx([0.75])


def test_model_names_with_colons_parse_and_reach_the_server():
    url = "http://127.0.0.1:11434/v1"
    assert rewards.parse_reward_spec(f"api:llava:13b@{url}") == [(1.0, "api", "llava:13b", url)]
    assert rewards.parse_reward_spec(f"api:hf.co/org/Model-GGUF:Q4_K_M@{url}*0.5+toy:temporal") == \
        [(0.5, "api", "hf.co/org/Model-GGUF:Q4_K_M", url), (1.0, "toy", "temporal_consistency", None)]
    for bad in ("videoscore:visual_quality:x", "videomae:a:b", "toy:temporal:extra"):  # a colon is the API's only
        with pytest.raises(ValueError):
            rewards.parse_reward_spec(bad)
    with Server(answer(0.75)) as srv:
        judge = rewards.load_reward(f"api:llava:13b@{srv.url}")
        assert judge.model == "llava:13b" and judge.name == "api:llava:13b"
        judge.backoff, judge.workers = 0.01, 1
        out = judge(*one_video())
        assert [r[2]["model"] for r in srv.requests] == ["llava:13b"]
    assert out["p_yes"].tolist() == pytest.approx([0.75])


def test_load_reward_passes_the_judge_timeout_and_retries():
    judge = rewards.load_reward("api:m@http://127.0.0.1:9/v1", judge_timeout=0.25, judge_retries=1)
    assert (judge.timeout, judge.retries) == (0.25, 1)
    default = rewards.load_reward("api:m@http://127.0.0.1:9/v1", judge_timeout=None, judge_retries=None)
    assert (default.timeout, default.retries) == (rewards.APIJudge(default.url).timeout, rewards.APIJudge(default.url).retries)
    both = rewards.load_reward("api:m@http://127.0.0.1:9/v1*0.5+toy:temporal", judge_timeout=2, judge_retries=0)
    assert [(r.timeout, r.retries) for _, r in both.terms if isinstance(r, rewards.APIJudge)] == [(2, 0)]
    assert rewards.load_reward("toy:temporal", judge_timeout=2, judge_retries=0).name  # other rewards ignore them
    with Server(hang=True) as srv:  # and they are the ones used
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            rewards.load_reward(f"api:m@{srv.url}", judge_timeout=0.2, judge_retries=0)(*one_video())
        assert len(srv.requests) == 1 and time.monotonic() - t0 < 2
    for bad in ({"judge_timeout": 0}, {"judge_retries": -1}):
        with pytest.raises(ValueError):
            rewards.load_reward("api:m@http://127.0.0.1:9/v1", **bad)
