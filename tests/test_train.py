"""One trial end to end on a tiny real backbone: measurements, honest selection, failures, determinism."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from autopeft.errors import TrialFailed
from autopeft.spec import Fidelity, PeftSpec
from autopeft.train import DataOptions, PeakMemory, TrialConfig, length_bucketed_batches, run_trial, train_and_evaluate

WORDS = {1: ["great", "superb", "lovely", "fun", "moving"], 0: ["awful", "dull", "boring", "bad", "tedious"]}


def write_sentiment_csv(path: Path, n: int, seed: int) -> Path:
    """A learnable toy sentiment task: the label is carried by one of a few words."""
    rng = random.Random(seed)
    lines = ["review,label"]
    for _ in range(n):
        y = rng.randint(0, 1)
        filler = " ".join(rng.choice(["the", "film", "was", "quite", "a", "story"]) for _ in range(rng.randint(2, 9)))
        lines.append(f"{filler} {rng.choice(WORDS[y])} {filler},{'pos' if y else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def toy_options(d: Path, n_train: int, n_dev: int) -> DataOptions:
    """The toy task as a user's CSV files (train seed 0, dev seed 1) in `d`."""
    return DataOptions(train_file=str(write_sentiment_csv(d / "train.csv", n_train, 0)),
                       dev_file=str(write_sentiment_csv(d / "dev.csv", n_dev, 1)),
                       text_column="review", label_column="label")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> DataOptions:
    return toy_options(tmp_path_factory.mktemp("toy"), 400, 120)


def cfg(backbone: Path, data: DataOptions, spec: dict, **fid: object) -> TrialConfig:
    fidelity = Fidelity(**{"train_examples": None, "epochs": 1, "batch_size": 16, "max_length": 32, **fid})
    return TrialConfig(task="file", spec=spec, backbone=str(backbone), fidelity=fidelity, data=data)


def test_trial_measures_everything(tiny_backbone_dir: Path, toy_data: DataOptions) -> None:
    spec = {"lora": {"rank": {"q": 4, "v": 4}}}
    result = run_trial(cfg(tiny_backbone_dir, toy_data, spec, max_steps=12), progress=False)
    m = result.metrics
    assert m.metric_name == "accuracy" and 0.0 <= m.metric <= 1.0
    assert m.steps == 12 and len(result.loss_curve) == 12
    assert m.trainable_params == sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert 0 < m.trainable_pct < 100
    assert m.tokens_per_s > 0 and m.train_seconds > 0 and m.eval_seconds > 0
    assert m.peak_memory_mb >= 0
    assert m.dev_metric is None  # scored on dev itself: nothing beside it
    assert isinstance(result.spec, PeftSpec) and result.spec.lora == {"q": (4, 4), "v": (4, 4)}


def test_training_learns_the_toy_task(tiny_backbone_dir: Path, toy_data: DataOptions) -> None:
    """A trial that trains must beat chance clearly on a task a tiny model can learn."""
    spec = {"lora": {"rank": {"q": 8, "v": 8}}, "serial_adapter": 16}
    m = run_trial(cfg(tiny_backbone_dir, toy_data, spec, epochs=10, lr=1e-2), progress=False).metrics
    assert m.metric >= 0.8, m


def test_heldout_selection_reports_dev_beside(tiny_backbone_dir: Path, toy_data: DataOptions) -> None:
    m = run_trial(cfg(tiny_backbone_dir, toy_data, {"ia3": ["k", "v"]}, max_steps=4), select="heldout",
                  heldout_fraction=0.25, progress=False).metrics
    assert m.dev_metric is not None and 0.0 <= m.dev_metric <= 1.0


def test_same_seed_same_losses(tiny_backbone_dir: Path, toy_data: DataOptions) -> None:
    """Trials share the in-memory template's frozen tensors; what they train (the head, BitFit's biases and
    LayerNorms) is their own, so the next trial starts from the very same backbone."""
    from autopeft import train

    c = cfg(tiny_backbone_dir, toy_data, {"prefix": 3, "bitfit": True}, max_steps=5, seed=3)
    first = run_trial(c, progress=False)
    (template, _), = train._TEMPLATE.values()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    b = run_trial(c, progress=False).loss_curve
    assert first.loss_curve == b
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in before.items())
    trained = dict(first.model.named_parameters())
    moved = [n for n, p in trained.items()  # the trial's model is on CUDA where there is one, the template on CPU
             if p.requires_grad and n in before and not torch.equal(p.detach().cpu(), before[n].cpu())]
    assert any("bias" in n for n in moved) and any("classifier" in n for n in moved), moved


def test_nan_loss_is_a_recorded_failure(tiny_backbone_dir: Path, toy_data: DataOptions) -> None:
    from autopeft.models import load_backbone

    task = toy_data.load("file")
    model, tok = load_backbone(str(tiny_backbone_dir), task.num_labels)
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(TrialFailed) as err:
        train_and_evaluate(model, tok, task, Fidelity(max_steps=3, batch_size=8), backbone_params=1,
                           cache_tag=("nan-test",), progress=False)
    assert err.value.reason == "nan"


def test_length_buckets_cover_every_example_once() -> None:
    lengths = [random.Random(i).randint(1, 60) for i in range(1003)]
    batches = length_bucketed_batches(lengths, 32, random.Random(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003))
    assert all(len(b) <= 32 for b in batches)
    # bucketing keeps padding low: within a batch lengths are close
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10


def test_cpu_peak_memory_sees_a_transient_and_does_not_carry_it_over() -> None:
    """A trial's memory is its own: a 64 MiB transient counts inside, and a later trial is not charged for it."""
    import time

    cpu = torch.device("cpu")
    with PeakMemory(cpu) as first:
        big = torch.ones(16 * 2**20)  # 64 MiB, freed before the context ends
        time.sleep(0.05)
        del big
    with PeakMemory(cpu) as second:
        time.sleep(0.05)
    assert 60 <= first.peak_mb <= 80, first.peak_mb
    assert second.peak_mb < 8, second.peak_mb


@pytest.mark.parametrize("hf_config", ["lora", "ia3"])
def test_hf_peft_parameters_train_at_our_methods_learning_rates(hf_config: str) -> None:
    """The benchmarks train HF PEFT models with our loop, so each HF parameter must land in its method's group:
    IA3's vectors (`ia3_l`) at IA3's learning rate, not the classifier head's (they once did, and HF PEFT's IA3
    trials trained at a third of ours and scored 6 points lower in bench/packing.py)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from autopeft.train import DEFAULT_LR, _param_groups
    from tests.conftest import tiny_model

    config = (LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]) if hf_config == "lora" else
              IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                        feedforward_modules=["output.dense"]))
    model = get_peft_model(tiny_model("bert"), config)
    lr = {id(p): g["lr"] for g in _param_groups(model, Fidelity()) for p in g["params"]}
    method = {n: DEFAULT_LR[hf_config] for n, _ in model.named_parameters() if hf_config + "_" in n}
    assert method  # the HF adapter's own parameters were found
    for name, p in model.named_parameters():
        if name in method:
            assert lr[id(p)] == method[name], name


@pytest.mark.parametrize("spec", [{"lora": {"rank": {"q": 4, "v": 4}}}, {"prefix": {"length": 3, "gate": False}},
                                  {"prefix": {"length": 3}}])
def test_a_causal_decoders_batches_need_no_mask(spec: dict) -> None:
    """Right-padded rows of a causal decoder score and train the same without the attention mask (which the
    trainer leaves out for them, so SDPA runs its causal kernel in CUDA graphs); an encoder keeps its mask."""
    from autopeft.models import is_causal
    from autopeft.peft import inject
    from autopeft.train import collate
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    inject(model, PeftSpec.from_dict(spec, num_layers=3))
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
    labels = torch.tensor([0, 1, 1])
    cpu = torch.device("cpu")
    masked, bare = collate(ids, [0, 1, 2], 0, cpu, width=8), collate(ids, [0, 1, 2], 0, cpu, width=8, causal=True)
    assert is_causal(model) and "attention_mask" not in bare and torch.equal(masked["input_ids"], bare["input_ids"])
    out = [model(**b, labels=labels) for b in (masked, bare)]
    torch.testing.assert_close(out[0].logits, out[1].logits, rtol=1e-5, atol=1e-6)
    grads = []
    for o in out:
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(o.loss, trainable))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not is_causal(tiny_model("bert")) and "attention_mask" in collate(ids, [0, 1], 0, cpu)
