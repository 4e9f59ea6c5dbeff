"""cli.py: one command line generator for train.py, probe.py and experiments.py; every flag has a help line
taken from its field's comment, and the flags come in the groups of the config's comments."""
import pytest

import cli
import experiments
import probe
import train

CONFIGS = [train.TrainConfig, probe.ProbeConfig, experiments.ExperimentConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_a_flag_with_help(cls):
    docs = cli.field_docs(cls)
    assert [name for name, _, _ in docs] == [f.name for f in cli.fields(cls)]
    assert all(help_text for _, help_text, _ in docs), [n for n, h, _ in docs if not h]
    parser = cli.parser_for(cls, "")
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {name for name, _, _ in docs} and all(a.help for a in flags.values())


def test_train_help_reads_as_a_table_of_contents(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    titles = ["What to train:", "Schedules (official configs/pretrain/vitl16.yaml):", "Objective and masks:",
              "Data:", "Run:", "Speed and memory:"]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    assert "peak learning rate" in text and "(default: 0.001)" in text
    with pytest.raises(SystemExit):  # --size changes the defaults shown
        train.parse_args(["--size", "vitl16", "--help"])
    assert "(default: 90000)" in capsys.readouterr().out


def test_types_bools_optionals_and_choices():
    cfg = probe.parse_args(["--batch-size", "32", "--random-init", "--size", "tiny"])
    assert cfg.batch_size == 32 and cfg.random_init and cfg.lr is None  # int | None: an int, or the default
    assert experiments.parse_args(["--quick", "--probe-lr", "1e-3"]) == experiments.ExperimentConfig(
        quick=True, probe_lr=1e-3)
    assert not train.parse_args(["--compile", "--no-compile"]).compile
    for bad in (["--label", "colour"], ["--batch", "3"]):  # a choice, and no abbreviations
        with pytest.raises(SystemExit):
            probe.parse_args(bad)
