"""The reference server's POST /load_weights is gated: off by default, a shared bearer token, and only
folders inside the one fixed at start. Every refused request leaves the served model as it was: the same
greedy completion and the same weights as before it."""

import http.client
import json
import os
import urllib.parse
from pathlib import Path

import pytest
import torch

from twlib.decoding import HFEngine
from twlib.infra.server import WEIGHT_TOKEN_ENV, main as serve_main, serve_hf

TOY = Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "toy-parallel"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TOY).eval(), AutoTokenizer.from_pretrained(TOY)


def post(url: str, route: str, body, token: str | None = None, raw_auth: str | None = None):
    """(status, JSON reply) of one POST, without the client's retries."""
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw_auth is not None:
        headers["Authorization"] = raw_auth
    conn.request("POST", route, json.dumps(body), headers)
    reply = conn.getresponse()
    status, data = reply.status, json.loads(reply.read())
    conn.close()
    return status, data


def greedy(url: str, tok) -> list[int]:
    status, data = post(url, "/v1/completions", {"prompt": tok.encode("A:a1b2 B:c3\n"), "max_tokens": 12,
                                                 "temperature": 0, "return_token_ids": True})
    assert status == 200, data
    return data["choices"][0]["token_ids"]


def save_shifted(model, folder: Path, shift: float = 0.05) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: (v + shift).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))


@pytest.fixture
def served(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TOY).eval()  # its own copy: a test may change it
    _, tok = toy
    allowed = tmp_path / "sync"
    allowed.mkdir()
    save_shifted(model, allowed / "step-1")
    save_shifted(model, tmp_path / "elsewhere")  # a valid weight folder outside the allowed one
    with serve_hf(HFEngine(model, tok), tokenizer=tok, weight_dir=allowed, weight_token=TOKEN) as server:
        yield server, model, tok, tmp_path


def assert_refused(server, model, tok, before_ids, before_weights, status, data, code, words):
    assert status == code, data
    assert data["error"]["code"] == code and words in data["error"]["message"], data
    assert server.weight_loads == 0
    assert greedy(server.url, tok) == before_ids
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_weights[k]), k


def test_weight_route_refuses_without_token_wrong_token_or_outside_path(served):
    server, model, tok, tmp = served
    before_ids = greedy(server.url, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inside = str(tmp / "sync" / "step-1")

    for body, kwargs, code, words in [
        ({"path": inside}, {}, 403, "needs the shared weight token"),
        ({"path": inside}, {"raw_auth": "Basic " + TOKEN}, 403, "needs the shared weight token"),
        ({"path": inside}, {"token": "wrong"}, 403, "wrong weight token"),
        ({"path": inside}, {"token": TOKEN + "x"}, 403, "wrong weight token"),
        ({"path": str(tmp / "elsewhere")}, {"token": TOKEN}, 403, "outside the weight folder"),
        ({"path": str(tmp / "sync" / ".." / "elsewhere")}, {"token": TOKEN}, 403, "outside the weight folder"),
        ({"path": "../elsewhere"}, {"token": TOKEN}, 403, "outside the weight folder"),
        ({"path": str(tmp / "sync" / "missing")}, {"token": TOKEN}, 400, "no such directory"),
        ({"path": 7}, {"token": TOKEN}, 400, "'path' must name a directory"),
    ]:
        status, data = post(server.url, "/load_weights", body, **kwargs)
        assert_refused(server, model, tok, before_ids, before, status, data, code, words)

    # a symlink inside the allowed folder that points outside it: resolved, refused
    (tmp / "sync" / "link").symlink_to(tmp / "elsewhere", target_is_directory=True)
    status, data = post(server.url, "/load_weights", {"path": str(tmp / "sync" / "link")}, token=TOKEN)
    assert_refused(server, model, tok, before_ids, before, status, data, 403, "outside the weight folder")
    # ... and a weight FILE inside it that links outside
    (tmp / "sync" / "filelink").mkdir()
    (tmp / "sync" / "filelink" / "model.safetensors").symlink_to(tmp / "elsewhere" / "model.safetensors")
    status, data = post(server.url, "/load_weights", {"path": str(tmp / "sync" / "filelink")}, token=TOKEN)
    assert_refused(server, model, tok, before_ids, before, status, data, 403, "links outside")

    # the right token and a folder inside: loaded (the test can fail: the weights do change)
    status, data = post(server.url, "/load_weights", {"path": inside}, token=TOKEN)
    assert status == 200 and data["weight_loads"] == 1, data
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    torch.testing.assert_close(model.model.embed_tokens.weight, before["model.embed_tokens.weight"] + 0.05)
    status, data = post(server.url, "/load_weights", {"path": "step-1"}, token=TOKEN)  # relative: below the folder
    assert status == 200 and data["weight_loads"] == 2, data


def test_weight_route_is_off_by_default(toy, tmp_path):
    model, tok = toy
    save_shifted(model, tmp_path / "w")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with serve_hf(HFEngine(model, tok), tokenizer=tok) as server:
        before_ids = greedy(server.url, tok)
        status, data = post(server.url, "/load_weights", {"path": str(tmp_path / "w")}, token=TOKEN)
        assert_refused(server, model, tok, before_ids, before, status, data, 403,
                       "weight updates are off on this server: start it with --allow-weight-updates DIR")
    with pytest.raises(ValueError, match="weight updates need a shared token"):
        serve_hf(HFEngine(model, tok), tokenizer=tok, weight_dir=tmp_path)


def test_serve_command_needs_a_token_for_weight_updates(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(WEIGHT_TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as stop:
        serve_main(["--model", str(TOY), "--allow-weight-updates", str(tmp_path)])
    assert stop.value.code == 2
    assert f"--allow-weight-updates needs a shared token: --weight-token TOKEN or ${WEIGHT_TOKEN_ENV}" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main(["--model", str(TOY), "--weight-token", "x"])
    assert "--weight-token without --allow-weight-updates" in capsys.readouterr().err
    from twlib.cli import main  # `python -m twlib serve` hands its whole command line to twlib.engines

    with pytest.raises(SystemExit):
        main(["serve", "--model", str(TOY), "--allow-weight-updates", str(tmp_path)])
    assert "twlib serve: error: --allow-weight-updates needs a shared token" in capsys.readouterr().err
    assert os.environ.get(WEIGHT_TOKEN_ENV) is None
