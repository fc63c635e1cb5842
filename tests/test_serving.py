"""A trained run's models after training (fedmrg.serving): `fedmrg generate`, the MLflow pyfunc
models, the registry and `mlflow models serve`.

A tiny run folder is built in process (config.yaml + two centers' models saved with
fedmrg.model.io, as a finished run leaves them); the pyfunc models are logged to a real sqlite
MLflow store, loaded back in a fresh process and served over HTTP. The end-of-run logging in a
real federated run is checked in test_federation_ray.py.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import TINY_MODEL
from servers import free_ports, wait_until_serving

from fedmrg.cli import main
from fedmrg.config import load_config
from fedmrg.data.schema import LABEL_NAMES, OBSERVATIONS
from fedmrg.data.transforms import ImageDecodeError, transform_study
from fedmrg.serving.predictor import (
    PredictorSettings,
    ReportPredictor,
    ServingError,
    findings_from_probabilities,
)

REGISTERED = "fedmrg-serving-test"
TINY = ["data.image_size=32", "eval.max_new_tokens=12",
        *(f"model.{key}={json.dumps(value)}" for key, value in TINY_MODEL.items())]


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move the diagnosis head and the adapters off their initial values (a trained model's
    probabilities and adapters are not uniform / zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("diagnosis_head.") or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    """<tmp>/runs/tiny: config.yaml and models/a, models/b (fedmrg.model.io folders)."""
    from fedmrg.model.base_lm import load_base_lm
    from fedmrg.model.io import save_model
    from fedmrg.model.mrg import MRGModel

    tmp = tmp_path_factory.mktemp("serving")
    cfg = load_config("default", [*TINY, f"model.lm_cache={tmp}/lm",
                                  f"tracking.storage_path={tmp}/runs",
                                  f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"])
    run_dir = tmp / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for seed, center in enumerate("ab"):
        lm, tok = load_base_lm(cfg.model, corpus=corpus)
        model = MRGModel.from_config(cfg.model, lm, tok, seed=seed)
        perturb(model, seed)
        own = copy.deepcopy(model.diagnosis_head)  # a center's own tuned head (another one)
        with torch.no_grad():
            own.linear.weight.add_(torch.randn(own.linear.weight.shape,
                                               generator=torch.Generator().manual_seed(seed)))
        model.set_own_diagnosis_head(own)
        save_model(model, run_dir / "models" / center)
    return {"tmp": tmp, "cfg": cfg, "run_dir": run_dir}


@pytest.fixture(scope="module")
def study() -> list[bytes]:
    from fedmrg.serving.pyfunc import example_study

    return example_study(48)  # 48 px: the stream resizes to data.image_size=32, as here


def _settings(cfg, personalized: bool = False) -> PredictorSettings:
    return PredictorSettings.from_config(cfg, personalized=personalized)


# --------------------------------------------------------------------------- the predictor


def test_predictions_are_what_the_evaluation_computes_for_the_study(tiny_run, study):
    from fedmrg.eval.evaluator import evaluate_model, generation_kwargs
    from fedmrg.model.io import load_model

    cfg, run_dir = tiny_run["cfg"], tiny_run["run_dir"]
    for personalized in (False, True):
        predictor = ReportPredictor.from_folder(run_dir / "models" / "a",
                                                _settings(cfg, personalized))
        [one, two] = predictor.predict([study[:1], study], names=["frontal", "both"])
        assert (one.study, one.views, two.views) == ("frontal", 1, 2)
        # the evaluation's own path on the same studies, preprocessed as the stream does
        model = load_model(run_dir / "models" / "a")
        pixels, masks = zip(*(transform_study(s, "x", 32, 2, 1) for s in (study[:1], study)),
                            strict=True)
        batch = {"images": torch.from_numpy(np.stack(pixels)),
                 "view_mask": torch.from_numpy(np.stack(masks)),
                 "labels": torch.zeros(2, len(OBSERVATIONS), dtype=torch.long),
                 "report": ["x", "x"]}
        evaluated = evaluate_model(model, [batch], personalized, meteor=False,
                                   **generation_kwargs(cfg.eval))
        assert [one.report, two.report] == evaluated.reports
        states = [[LABEL_NAMES.index(f.state) for f in p.findings] for p in (one, two)]
        assert np.array_equal(np.array(states), evaluated.predicted_states)
        with torch.no_grad():
            features = model.encode_features(batch)
            # a center's own model: its own head; the generic model: the shared one
            head = model.own_diagnosis_head if personalized else model.diagnosis_head
            probs = torch.softmax(head(features), -1).numpy()
        for prediction, expected in zip((one, two), probs, strict=True):
            assert [f.observation for f in prediction.findings] == list(OBSERVATIONS)
            got = np.array([[f.probabilities[n] for n in LABEL_NAMES]
                            for f in prediction.findings])
            np.testing.assert_allclose(got, expected, atol=1e-6)
            assert all(f.probability == max(f.probabilities.values())
                       for f in prediction.findings)


def test_settings_round_trip_and_bad_input_errors(tiny_run, tmp_path):
    settings = _settings(tiny_run["cfg"], personalized=True)
    assert PredictorSettings.read(settings.write(tmp_path / "s.json")) == settings
    with pytest.raises(ServingError, match="unknown key 'colour'"):
        PredictorSettings.from_dict({**settings.to_dict(), "colour": 1})
    with pytest.raises(ServingError, match=r"expected shape \(14, 4\)"):
        findings_from_probabilities(np.ones((14, 3)))
    predictor = ReportPredictor.from_folder(tiny_run["run_dir"] / "models" / "b", settings)
    with pytest.raises(ImageDecodeError, match="study 'scan.png' view 0: not a recognizable"):
        predictor.predict([[b"not a png"]], names=["scan.png"])
    assert predictor.predict([]) == []


def test_a_model_whose_base_lm_changed_is_a_clear_error(tiny_run, corpus, tmp_path):
    """Saved against an LM folder (model.lm = a path), then that folder holds another LM."""
    from fedmrg.model.base_lm import load_base_lm
    from fedmrg.model.io import ModelIOError, load_model, save_model
    from fedmrg.model.mrg import MRGModel

    cfg = tiny_run["cfg"]
    lm_dir = tmp_path / "lm"
    lm, tok = load_base_lm(cfg.model, corpus=corpus)
    lm.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    model_cfg = cfg.model.__class__(**{**cfg.model.__dict__, "lm": str(lm_dir)})
    model = MRGModel.from_config(model_cfg, lm, tok)
    save_model(model, tmp_path / "model")  # a path LM: not bundled
    load_model(tmp_path / "model")  # the same LM: loads
    other_cfg = cfg.model.__class__(**{**cfg.model.__dict__, "lm_hidden_size": 48})
    other, other_tok = load_base_lm(other_cfg, corpus=corpus)
    other.save_pretrained(lm_dir)
    with pytest.raises(ModelIOError, match=r"another base LM .*hidden_size 32 here 48"):
        load_model(tmp_path / "model")
    with pytest.raises(ServingError, match="another base LM"):
        ReportPredictor.from_folder(tmp_path / "model", _settings(cfg))


def test_findings_text_and_the_prompt_built_from_it():
    from fedmrg.model.prompts import diagnosis_prompt, findings_text

    states = [0] * 14
    assert findings_text(states) == "none" and diagnosis_prompt(states) == (
        "Findings to report: none.")
    states[1], states[9] = 1, 2
    assert findings_text(np.array(states)) == "cardiomegaly: positive; pleural effusion: negative"
    assert diagnosis_prompt(states) == ("Findings to report: cardiomegaly: positive; pleural "
                                        "effusion: negative.")


def test_run_description_says_what_ran_and_how_it_ended(tiny_run):
    from fedmrg.tracking import run_description

    cfg = tiny_run["cfg"]
    start = run_description(cfg, ["a", "b"], ["heldout"])
    assert start.startswith("**fedmrg fedmrg**: 2 centers (a, b), held out: heldout; 10 rounds")
    assert "Final" not in start and "resnet10t encoder" in start
    end = run_description(cfg, ["a", "b"], results={
        "generalization": {"mean": {"ce_f1_macro": 0.25, "bleu4": 0.1}},
        "personalization": {"mean": {"ce_f1_macro": 0.5}}})
    assert "Final generalization (mean over centers): ce_f1_macro 0.250, bleu4 0.100." in end
    assert "Final personalization (mean over centers): ce_f1_macro 0.500." in end
    assert "Models: `generic` on this run;" in end


# --------------------------------------------------------------------------- run folders


def test_run_models_generic_by_default_a_center_personalized(tiny_run):
    from fedmrg.serving.sources import run_folder, run_model

    run_dir, storage = tiny_run["run_dir"], tiny_run["cfg"].tracking.storage_path
    assert run_folder("tiny", storage) == run_folder(run_dir, "elsewhere") == run_dir
    folder, settings = run_model(run_dir)
    assert folder.name == "a" and not settings.personalized
    assert settings.generation["max_new_tokens"] == 12 and settings.image_size == 32
    folder, settings = run_model(run_dir, "b")
    assert folder.name == "b" and settings.personalized
    with pytest.raises(ServingError, match=r"unknown run 'nope'.*runs there: \['tiny'\]"):
        run_folder("nope", storage)
    with pytest.raises(ServingError, match=r"no model of center 'z'; its models: \['a', 'b'\]"):
        run_model(run_dir, "z")


def test_generate_command_prints_findings_and_report(tiny_run, study, tmp_path):
    from fedmrg.serving.sources import run_predictor

    frontal, lateral = tmp_path / "f.png", tmp_path / "l.png"
    frontal.write_bytes(study[0])
    lateral.write_bytes(study[1])
    storage = f"tracking.storage_path={tiny_run['cfg'].tracking.storage_path}"
    runner = CliRunner()
    out = runner.invoke(main, ["generate", "--run", "tiny", "--set", storage, "--center", "b",
                               "--format", "json", f"{frontal},{lateral}", str(frontal)])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    expected = run_predictor(tiny_run["run_dir"], "b").predict([study, study[:1]])
    assert [g["report"] for g in got] == [e.report for e in expected]
    assert [g["views"] for g in got] == [2, 1] and len(got[0]["findings"]) == 14
    assert got[0]["study"] == f"{frontal},{lateral}"
    text = runner.invoke(main, ["generate", "--run", str(tiny_run["run_dir"]), str(frontal)])
    assert text.exit_code == 0
    assert "cardiomegaly" in text.output and "report:" in text.output
    assert expected[1].report not in ("",) and run_predictor(tiny_run["run_dir"]).predict(
        [study[:1]])[0].report in text.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    # exit 2: a bad option, run or path; 3: the data itself (an image that does not decode)
    for args, message, code in [
        (["--run", "nope", str(frontal)], "unknown run 'nope'", 2),
        (["--run", "tiny", "--center", "z", str(frontal)], "no model of center 'z'", 2),
        (["--run", "tiny", str(bad)], "not a recognizable image", 3),
        (["--run", "tiny", str(tmp_path / "missing.png")], "missing.png: cannot read", 2),
        ([str(frontal)], "--run RUN or --model URI", 2),
    ]:
        result = runner.invoke(main, ["generate", "--set", storage, *args])
        assert result.exit_code == code and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- MLflow models


def test_pyfunc_input_frame_errors_name_the_row_and_column():
    from fedmrg.serving.pyfunc import studies_from_frame

    frame = pd.DataFrame({"image_1": [b"a", b"c"], "image_2": [b"b", None]})
    assert studies_from_frame(frame, 2) == [[b"a", b"b"], [b"c"]]
    with pytest.raises(ServingError, match="unknown input column 'image_3'"):
        studies_from_frame(pd.DataFrame({"image_1": [b"a"], "image_3": [b"b"]}), 2)
    with pytest.raises(ServingError, match="row 1: no 'image_1'"):
        studies_from_frame(pd.DataFrame({"image_1": [b"a", b""], "image_2": [b"b", b"c"]}), 2)
    with pytest.raises(ServingError, match="row 0, column 'image_1': expected encoded image"):
        studies_from_frame(pd.DataFrame({"image_1": [3]}), 2)


@pytest.fixture(scope="module")
def logged(tiny_run):
    """The tiny run's models logged as a finished run's would be: generic on the parent
    (registered), a's personalized on its nested run."""
    from mlflow import MlflowClient

    from fedmrg.serving.pyfunc import log_run_models

    uri = tiny_run["cfg"].tracking.tracking_uri
    client = MlflowClient(uri)
    experiment = client.create_experiment("serving", artifact_location=str(
        tiny_run["tmp"] / "mlartifacts"))
    parent = client.create_run(experiment, run_name="tiny")
    # one center's run is enough here (each model logged costs seconds)
    centers = {"a": client.create_run(experiment, run_name="center=a", tags={
        "mlflow.parentRunId": parent.info.run_id}).info.run_id}
    uris = log_run_models(tiny_run["run_dir"], uri, parent.info.run_id, centers,
                          registered_name=REGISTERED)
    return {"uris": uris, "client": client, "experiment": experiment, "uri": uri,
            "parent": parent.info.run_id, "centers": centers}


def test_run_models_are_logged_with_signature_example_and_peft_adapters(logged, tmp_path):
    import mlflow
    from mlflow.models import Model

    client = logged["client"]
    models = client.search_logged_models([logged["experiment"]])
    by_run = {m.source_run_id: m for m in models}
    assert sorted(by_run) == sorted([logged["parent"], *logged["centers"].values()])
    assert by_run[logged["parent"]].name == "generic"
    assert {by_run[r].name for r in logged["centers"].values()} == {"personalized"}
    assert client.get_model_version(REGISTERED, "1").source == logged["uris"]["generic"]
    mlflow.set_tracking_uri(logged["uri"])
    generic = Path(mlflow.artifacts.download_artifacts(logged["uris"]["generic"],
                                                       dst_path=str(tmp_path / "g")))
    personal = Path(mlflow.artifacts.download_artifacts(logged["uris"]["a"],
                                                        dst_path=str(tmp_path / "a")))
    meta = Model.load(str(generic / "MLmodel"))
    assert [c["name"] for c in meta.signature.inputs.to_dict()] == ["image_1", "image_2"]
    assert [c["name"] for c in meta.signature.outputs.to_dict()] == ["report", "findings",
                                                                     "views"]
    assert (generic / "input_example.json").is_file()
    # PEFT folders: only the generic adapter in the shared model, both in a center's
    assert sorted(p.name for p in (generic / "artifacts" / "model" / "adapters").iterdir()
                  if p.is_dir()) == ["generic"]
    adapters = personal / "artifacts" / "a" / "adapters"
    assert sorted(p.name for p in adapters.iterdir() if p.is_dir()) == ["generic",
                                                                         "specialized"]
    assert (adapters / "specialized" / "adapter_config.json").is_file()
    settings = json.loads((personal / "artifacts" / "settings.json").read_text())
    assert settings["personalized"] is True


def test_a_registered_model_predicts_in_a_fresh_process(logged, tiny_run, study, tmp_path):
    from fedmrg.serving.sources import run_predictor

    frame = pd.DataFrame({"image_1": [study[0], study[0]], "image_2": [study[1], None]})
    frame.to_pickle(tmp_path / "in.pkl")
    script = (
        "import sys, json, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(pd.read_pickle(sys.argv[2]))\n"
        "print(json.dumps({'reports': list(out['report']), 'views': [int(v) for v in "
        "out['views']], 'state': out['findings'][0][1]['state']}))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"]}
    done = subprocess.run([sys.executable, "-c", script, f"models:/{REGISTERED}/1",
                           str(tmp_path / "in.pkl")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    expected = run_predictor(tiny_run["run_dir"]).predict([study, study[:1]])
    assert got["reports"] == [p.report for p in expected]
    assert got["views"] == [2, 1] and got["state"] == expected[0].findings[1].state
    # `fedmrg generate --model` reads the same registered model
    (tmp_path / "f.png").write_bytes(study[0])
    out = CliRunner().invoke(main, ["generate", "--model", f"models:/{REGISTERED}/1", "--set",
                                    f"tracking.tracking_uri={logged['uri']}", "--format",
                                    "json", str(tmp_path / "f.png")])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["report"] == expected[1].report


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request(logged, tiny_run, study, tmp_path):
    from fedmrg.serving.sources import run_predictor

    (port,) = free_ports(1)
    bin_dir = str(Path(sys.executable).parent)  # the server runs uvicorn from the PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"],
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
         f"models:/{REGISTERED}/1", "--env-manager", "local", "-h", "127.0.0.1", "-p",
         str(port), "-w", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        # a log file, not a pipe: a server that never answers is stopped below, not waited on
        wait_until_serving(server, f"http://127.0.0.1:{port}/ping", log_path, timeout_s=180)
        body = {"dataframe_split": {"columns": ["image_1", "image_2"], "data": [
            [base64.b64encode(study[0]).decode(), base64.b64encode(study[1]).decode()]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)  # mlflow and the uvicorn it started
        server.wait(timeout=20)
        log.close()
    [row] = answer["predictions"]
    [expected] = run_predictor(tiny_run["run_dir"]).predict([study])
    assert row["report"] == expected.report and row["views"] == 2
    assert [f["observation"] for f in row["findings"]] == list(OBSERVATIONS)
    assert row["findings"][0]["probability"] == pytest.approx(
        expected.findings[0].probability, abs=1e-6)
