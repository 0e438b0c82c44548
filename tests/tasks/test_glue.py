"""GLUE from a local directory in GLUE's own layout: every task's file shape, labels and the real SST-2/CoLA."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopeft.errors import UserError
from autopeft.tasks import GLUE_TASKS, known_tasks, load_task, normalise_task, resolve_data_dir

# One header (or headerless) layout per task, as GLUE's download script writes them.
LAYOUTS = {
    "cola": (None, ["src\t1\t\tA fine sentence .", "src\t0\t*\tSentence fine a ."]),
    "sst2": ("sentence\tlabel", ["a charming film \t1", "a \"dull\" film \t0"]),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", ["1\t1\t2\tHe came .\tHe arrived .", "0\t3\t4\tA .\tB ."]),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", ["0\t1\t2\tWhy ?\tHow come ?\t1",
                                                                    "1\t3\t4\tWhat ?\tWho ?\t0"]),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
             ["0\tg\tf\ty\t0\ts\ts\tA man .\tA person .\t4.2", "1\tg\tf\ty\t1\ts\ts\tA cat .\tRain .\t0.5"]),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             ["0\t1\t1\tg\tb\tb\tp\tp\tIt rains .\tIt is wet .\tentailment\tentailment",
              "1\t2\t2\tg\tb\tb\tp\tp\tIt rains .\tIt is dry .\tcontradiction\tcontradiction",
              "2\t3\t3\tg\tb\tb\tp\tp\tIt rains .\tI sing .\tneutral\tneutral"]),
    "qnli": ("index\tquestion\tsentence\tlabel", ["0\tWho ?\tHim .\tentailment", "1\tWhy ?\tNo .\tnot_entailment"]),
    "rte": ("index\tsentence1\tsentence2\tlabel", ["0\tA .\tA .\tentailment", "1\tA .\tB .\tnot_entailment"]),
    "wnli": ("index\tsentence1\tsentence2\tlabel", ["0\tA .\tA .\t1", "1\tA .\tB .\t0"]),
}


def write_task(root: Path, name: str) -> Path:
    header, rows = LAYOUTS[name]
    d = root / "glue" / name
    d.mkdir(parents=True)
    body = "\n".join(([header] if header else []) + rows) + "\n"
    (d / "train.tsv").write_text(body)
    (d / ("dev_matched.tsv" if name == "mnli" else "dev.tsv")).write_text(body)
    return d


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_every_glue_task_reads_its_own_layout(tmp_path: Path, name: str) -> None:
    write_task(tmp_path, name)
    data = load_task(f"glue/{name}", tmp_path)
    task = GLUE_TASKS[name]
    assert data.name == f"glue/{name}" and data.metric_name == task.metric
    assert len(data.train) == len(data.dev) == len(LAYOUTS[name][1])
    assert (data.train.text_pair is None) == (task.hub_columns[1] is None)
    if data.is_regression:
        assert data.train.label == [4.2, 0.5]
    else:
        assert set(data.train.label) <= set(range(task.num_labels)) and len(set(data.train.label)) > 1
    if name == "mnli":  # string labels map to the hub's ids
        assert data.train.label == [0, 2, 1]
    if name == "sst2":  # bare quotes are text, not CSV quoting (GLUE's QUOTE_NONE)
        assert data.train.text[1] == 'a "dull" film '


def test_real_sst2_and_cola_have_glue_sizes(shared_data: Path) -> None:
    sst2 = load_task("glue/sst2", shared_data)
    assert (len(sst2.train), len(sst2.dev)) == (67349, 872)
    assert sum(sst2.dev.label) == 444 and sst2.train.text[0].startswith("hide new secretions")
    cola = load_task("glue/cola", shared_data)
    assert (len(cola.train), len(cola.dev)) == (8551, 1043)
    assert sum(cola.dev.label) == 721 and cola.metric_name == "matthews"


def test_task_names_are_forgiving_and_unknown_ones_suggest(tmp_path: Path) -> None:
    assert normalise_task("SST-2") == normalise_task("glue/sst2") == "glue/sst2"
    with pytest.raises(UserError, match="glue/sst2"):
        normalise_task("glue/sst3")
    assert "glue/stsb" in known_tasks() and "file" in known_tasks()


def test_malformed_rows_name_the_file_and_line(tmp_path: Path) -> None:
    d = write_task(tmp_path, "rte")
    (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA .\tA .\tmaybe\n")
    with pytest.raises(UserError, match=r"train.tsv line 2.*maybe"):
        load_task("glue/rte", tmp_path)


def test_missing_local_task_falls_back_to_the_hub_with_clear_advice(tmp_path: Path, monkeypatch) -> None:
    import datasets

    def offline(*a: object, **k: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="AUTOPEFT_DATA_DIR"):
        load_task("glue/qnli", tmp_path)


def test_data_dir_flag_beats_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AUTOPEFT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    with pytest.raises(UserError, match="AUTOPEFT_DATA_DIR"):
        resolve_data_dir(None)
    monkeypatch.delenv("AUTOPEFT_DATA_DIR")
    assert resolve_data_dir(None) is None
