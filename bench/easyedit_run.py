"""horen-fast driven by EasyEdit's real code (BaseEditor.edit and its evaluation), unpatched.

EasyEdit is not on PyPI in a current version and its requirements pin heavy packages, so this is a
script, not a test. It needs a checkout of https://github.com/zjunlp/EasyEdit (the ``easyeditor``
folder is enough) and runs on a tiny random Llama built offline (tests/tiny_models.py), or on a
model folder of your own (``--model``; EasyEdit's loader wants "llama", "qwen", "gpt", "mistral"
... in the folder name)::

    git clone --depth 1 https://github.com/zjunlp/EasyEdit /tmp/EasyEdit
    python bench/easyedit_run.py --easyedit /tmp/EasyEdit            # tiny random Llama, ~1 min

With every EasyEdit requirement installed (``pip install -r /tmp/EasyEdit/requirements.txt``) it
imports EasyEdit as it is. Without them, ``--stub-missing`` (the default) lets EasyEdit's own
files import third-party modules that are not installed as inert stand-ins (only imports made
from EasyEdit's files; none of them is called on the paths run here: BaseEditor, edit,
restore_after_edit, compute_edit_quality, test_prediction_acc). Every EasyEdit file runs
unmodified.

What it runs and prints (JSON; ``--out`` writes it too):
1. ``horen_fast.easyedit.register()`` and ``BaseEditor.from_hparams(HoReNHyperParams(...))`` with
   EasyEdit's own keys (evaluation_type, fp16, model_parallel) in the hyper-parameters;
2. ``editor.edit(..., sequential_edit=True)``: EasyEdit's pre/post metrics (teacher-forced
   rewrite_acc, rephrase_acc, locality) as EasyEdit reports them;
3. after all edits, the same records scored on the model EasyEdit got back by EasyEdit's vanilla
   generation (``test_prediction_acc(..., vanilla_generation=True)``: cache-free greedy
   ``model.generate``, the published harness's metric) and by horen-fast's own metrics
   (``horen_fast.metrics``, SPEC 6: Rel / Gen / Loc / OP);
4. ``editor.edit(..., sequential_edit=False)`` (EasyEdit restores after each record) and whether
   the model is bitwise the original afterwards;
5. ``batch_edit`` and ``normal_edit``: EasyEdit asserts these for its fixed list of batchable
   method names; the script reports the assertion.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECORDS = [  # words of the tiny tokenizer's vocabulary (tests/tiny_models.py)
    ("the capital of France is", "Tokyo", "which city is the capital of France", "the song was written by", "Mozart"),
    ("the language of Egypt is", "Japanese", "what language is spoken in Egypt", "the film was directed by", "Newton"),
    ("Einstein plays", "violin", "what does Einstein play", "who lives in Berlin", "Curie"),
    ("the official currency of Japan is", "football", "what is the currency of Japan", "the album was called", "red"),
    ("Darwin was born in", "Italy", "where was Darwin born", "which team plays football", "Madrid"),
]


# ---- stand-ins for EasyEdit's uninstalled third-party imports ------------------------------------
class _Anything(type):
    """A class that stands for any attribute, call, decorator, base class or item of a module that
    is not installed."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Anything(name, (object,), {"__module__": cls.__module__})

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:   # used as a decorator
            return args[0]
        return _Anything("instance", (object,), {})

    def __iter__(cls):
        return iter(())

    def __getitem__(cls, key):
        return _Anything("item", (object,), {})


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Anything(name, (object,), {"__module__": self.__name__})


class StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a stand-in module for an import that no other finder can serve, when the import
    statement is in one of EasyEdit's files (``/easyeditor/`` in its path); anything else (e.g.
    transformers probing for optional packages) sees the module as missing, as it is."""

    def __init__(self):
        self.served: list[str] = []

    @staticmethod
    def _from_easyedit() -> bool:
        f = sys._getframe(2)
        while f is not None:
            name = f.f_code.co_filename
            if "importlib" not in name and not name.startswith("<frozen"):
                return f"{os.sep}easyeditor{os.sep}" in name
            f = f.f_back
        return False

    def find_spec(self, fullname, path, target=None):
        if not self._from_easyedit():
            return None
        for finder in sys.meta_path:
            if finder is not self:
                try:
                    if finder.find_spec(fullname, path, target) is not None:
                        return None
                except Exception:  # noqa: BLE001 - a finder that cannot answer: not ours to judge
                    continue
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        self.served.append(spec.name)
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


# ---- the run -----------------------------------------------------------------------------------
def tiny_model_dir(tmp: Path) -> str:
    """Save the tests' tiny random Llama and tokenizer to a folder EasyEdit's loader accepts."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models as tm
    path = tmp / "tiny-llama"
    tm.model("llama").save_pretrained(path)
    tm.tokenizer().save_pretrained(path)
    return str(path)


def records(n: int, path: str | None = None):
    """EasyEdit's request lists for ``n`` records: the tiny vocabulary's, or the first ``n`` of a
    ZsRE / EasyEdit records file (``--data``)."""
    if path:
        from horen_fast.data import ALL_FIELDS, read_records
        rows = [(r.prompt, r.target, r.rephrase, r.loc_prompt, r.loc_answer)
                for r in read_records(path, require=ALL_FIELDS)[:n]]
    else:
        rows = (RECORDS * (n // len(RECORDS) + 1))[:n]
    return dict(prompts=[r[0] for r in rows], target_new=[r[1] for r in rows],
                rephrase_prompts=[r[2] for r in rows],
                locality_inputs={"neighborhood": {"prompt": [r[3] for r in rows],
                                                  "ground_truth": [r[4] for r in rows]}})


def mean_metric(metrics, phase: str, key: str):
    vals = []
    for m in metrics:
        v = m[phase].get(key) if key in m[phase] else m[phase].get("locality", {}).get(key)
        if v is not None:
            vals.extend(v if isinstance(v, list) else [v])
    return round(sum(vals) / len(vals), 4) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--easyedit", default=os.environ.get("EASYEDIT_DIR"),
                    help="a checkout of zjunlp/EasyEdit (the folder holding easyeditor/); or EASYEDIT_DIR")
    ap.add_argument("--model", help="a local model folder (default: the tests' tiny random Llama)")
    ap.add_argument("--hparams", help="a HoReN YAML file (default: tiny-model settings, layer 2)")
    ap.add_argument("--records", type=int, default=5)
    ap.add_argument("--data", help="ZsRE / EasyEdit records (JSON or JSON Lines; default: tiny-vocabulary records)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-stub-missing", dest="stub", action="store_false",
                    help="import EasyEdit with its requirements installed, no stand-ins")
    ap.add_argument("--backend", default="auto", help="horen-fast's retrieval backend (default auto)")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve() if args.out else None
    data_path = str(Path(args.data).resolve()) if args.data else None
    if args.hparams:                                 # read after the chdir below: make it absolute
        args.hparams = str(Path(args.hparams).resolve())
    if not args.easyedit or not (Path(args.easyedit) / "easyeditor").is_dir():
        print("error: --easyedit must name a checkout of https://github.com/zjunlp/EasyEdit (a folder "
              "holding easyeditor/); e.g. git clone --depth 1 https://github.com/zjunlp/EasyEdit /tmp/EasyEdit",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(args.easyedit).resolve()))
    stand_ins = StandIns()
    if args.stub:
        sys.meta_path.append(stand_ins)

    import torch
    from horen_fast import easyedit
    from horen_fast import metrics as hm
    from horen_fast.data import EditRecord

    t0 = time.perf_counter()
    from easyeditor import BaseEditor
    from easyeditor.evaluate.evaluate_utils import test_prediction_acc
    report = {"easyedit": str(args.easyedit), "import_seconds": round(time.perf_counter() - t0, 1),
              "stand_ins": sorted(set(stand_ins.served))}
    easyedit.register()

    work = Path(tempfile.mkdtemp(prefix="horen-easyedit-"))
    os.chdir(work)                                   # EasyEdit writes logs/ in the working directory
    model_dir = args.model or tiny_model_dir(work)
    keys = dict(alg_name="HOREN", model_name=model_dir, device=args.device, model_parallel=False,
                fp16=False, evaluation_type="teacher-forcing", batch_size=1, max_length=64,
                backend=args.backend)
    if args.hparams:
        hp = easyedit.HoReNHyperParams.from_hparams(args.hparams)
        for k, v in keys.items():
            setattr(hp, k, v)
    else:
        hp = easyedit.HoReNHyperParams(inner_params=["model.layers[2].mlp.down_proj.weight"], n_iter=30,
                                       hopfield_key_match_threshold=0.85, **keys)
    data = records(args.records, data_path)

    def fresh_editor():
        return BaseEditor.from_hparams(hp)

    # 2. sequential editing, EasyEdit's own metrics
    editor = fresh_editor()
    recs = [EditRecord(p, t, r, lp, la) for p, t, r, lp, la in zip(
        data["prompts"], data["target_new"], data["rephrase_prompts"],
        data["locality_inputs"]["neighborhood"]["prompt"], data["locality_inputs"]["neighborhood"]["ground_truth"])]
    loc_before = hm.locality_reference(editor.model, editor.tok, recs)
    t0 = time.perf_counter()
    metrics, edited, _ = editor.edit(**data, sequential_edit=True, verbose=False)
    seq = {"seconds": round(time.perf_counter() - t0, 1), "edited_model": type(edited).__name__}
    for phase in ("pre", "post"):
        seq[phase] = {k: mean_metric(metrics, phase, k)
                      for k in ("rewrite_acc", "rephrase_acc", "neighborhood_acc")}
    # 3. vanilla generation on the model EasyEdit got back (after all edits)
    gen = [test_prediction_acc(edited, editor.tok, hp, p, t, args.device, vanilla_generation=True)[0]
           for p, t in zip(data["prompts"], data["target_new"])]
    seq["post_all_vanilla_generation_rewrite_acc"] = round(sum(gen) / len(gen), 4)
    # horen-fast's own metrics (SPEC 6: greedy generation, KV cache) on the same model, after all edits
    ours = hm.aggregate(hm.evaluate_records(edited, editor.tok, recs, loc_before))
    seq["post_all_horen_fast_eval"] = {k: round(v, 4) for k, v in ours.items() if k != "n"}
    report["sequential_edit"] = seq

    # 4. non-sequential: EasyEdit restores after each record
    editor = fresh_editor()
    probe = editor.tok(["the capital of France is Tokyo"], return_tensors="pt").to(args.device)
    with torch.no_grad():
        ref = editor.model(**probe).logits
    metrics, _, _ = editor.edit(**data, sequential_edit=False, verbose=False)
    with torch.no_grad():
        same = torch.equal(editor.model(**probe).logits, ref)
    report["non_sequential_edit"] = {
        "post_rewrite_acc": mean_metric(metrics, "post", "rewrite_acc"),
        "post_neighborhood_acc": mean_metric(metrics, "post", "neighborhood_acc"),
        "model_bitwise_original_after": same,
        "editor_left_on_model": easyedit.EDITOR_ATTR in editor.model.__dict__}

    # 5. batch_edit / normal_edit
    for name in ("batch_edit", "normal_edit"):
        try:
            getattr(editor, name)(prompts=data["prompts"], target_new=data["target_new"])
            report[name] = "ran"
        except AssertionError as exc:
            report[name] = f"AssertionError: {exc}"
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
