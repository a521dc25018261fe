"""Config loading: precedence, includes, strict keys and types, value checks, round trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    MOVED_KEYS,
    Config,
    DemoConfig,
    ModelConfig,
    check_corpus_run,
    check_shards,
    check_tensor_parallel,
    check_tokenizer_vocab,
    check_world_size,
    config_from_dict,
    dump_yaml,
    load_config,
    to_dict,
    validate,
)
from pipeline.errors import ConfigError, ProsecoError

PRESETS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- precedence and includes -------------------------------------------------------------


def test_defaults_when_nothing_given():
    assert load_config() == Config()
    assert load_config([], []) == Config()


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    f = write(tmp_path / "a.yaml", "model: {hidden: 128, layers: 5}\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(str(f), ["model.hidden=256"])
    assert cfg.model.hidden == 256  # override beats YAML
    assert cfg.model.layers == 5  # YAML beats default
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.heads == Config().model.heads  # untouched default


def test_later_files_and_later_overrides_win(tmp_path):
    a = write(tmp_path / "a.yaml", "model: {hidden: 128, layers: 5}\n")
    b = write(tmp_path / "b.yaml", "model: {hidden: 256}\n")
    cfg = load_config([str(a), str(b)], ["optim.steps=3", "optim.steps=7"])
    assert (cfg.model.hidden, cfg.model.layers, cfg.optim.steps) == (256, 5, 7)


def test_include_chain_resolves_relative_to_including_file(tmp_path):
    write(tmp_path / "presets" / "base.yaml", "model: {hidden: 128, layers: 4}\noptim: {steps: 10}\n")
    write(tmp_path / "presets" / "mid.yaml", "include: base.yaml\nmodel: {layers: 6}\n")
    top = write(tmp_path / "top.yaml", "include: presets/mid.yaml\noptim: {steps: 20}\n")
    cfg = load_config(str(top))
    assert (cfg.model.hidden, cfg.model.layers, cfg.optim.steps) == (128, 6, 20)


def test_include_list_applies_in_order_before_own_keys(tmp_path):
    write(tmp_path / "one.yaml", "model: {hidden: 128}\noptim: {steps: 1}\n")
    write(tmp_path / "two.yaml", "model: {hidden: 256}\n")
    top = write(tmp_path / "top.yaml", "include: [one.yaml, two.yaml]\noptim: {steps: 3}\n")
    cfg = load_config(str(top))
    assert (cfg.model.hidden, cfg.optim.steps) == (256, 3)


def test_include_cycle_and_missing_files_are_config_errors(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    write(tmp_path / "c.yaml", "include: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "c.yaml"))


def test_empty_file_and_empty_section_are_fine(tmp_path):
    assert load_config(str(write(tmp_path / "e.yaml", "# nothing\n"))) == Config()
    assert load_config(str(write(tmp_path / "s.yaml", "demo:\n  # defaults\n"))) == Config()


def test_bad_yaml_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(str(write(tmp_path / "bad.yaml", "model: {hidden: [\n")))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(write(tmp_path / "list.yaml", "- 1\n- 2\n")))
    with pytest.raises(ConfigError, match="'model'"):
        load_config(str(write(tmp_path / "sec.yaml", "model: 3\n")))


# --- strict keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named", "suggested"),
    [
        ("model.hiden=3", "model.hiden", "model.hidden"),
        ("modle.hidden=3", "modle.hidden", "model.hidden"),
        ("optim.warmup=5", "optim.warmup", "optim.warmup_steps"),
        ("sampler.corector_steps=2", "sampler.corector_steps", "sampler.corrector_steps"),
        ("model.qqqqqqqqqqqq=1", "model.qqqqqqqqqqqq", None),  # nothing close: no suggestion
    ],
)
def test_unknown_key_names_it_and_suggests(override, named, suggested):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    assert f"'{named}'" in msg
    assert (f"did you mean '{suggested}'?" in msg) if suggested else ("did you mean" not in msg)


def test_errors_in_yaml_files_name_the_dotted_key_and_the_file(tmp_path):
    f = write(tmp_path / "a.yaml", "model:\n  hiddn: 8\n")
    with pytest.raises(ConfigError, match=r"'model\.hiddn'.*did you mean 'model\.hidden'.*a\.yaml"):
        load_config(str(f))
    f = write(tmp_path / "b.yaml", "optim:\n  batch_size: '128'\n")
    with pytest.raises(ConfigError, match=r"config key 'optim\.batch_size': expected int.*b\.yaml"):
        load_config(str(f))


@pytest.mark.parametrize("override", ["model.hidden", "=3", "hidden=3", "  =x"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(ConfigError):
        load_config(overrides=[override])


# --- types ---------------------------------------------------------------------------------


def test_type_error_message_form():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.hidden=abc"])
    assert "config key 'model.hidden': expected int, got 'abc'" in str(info.value)
    assert isinstance(info.value, ProsecoError)  # so the CLI reports it without a traceback


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.hidden=abc", "expected int"),
        ("model.hidden=1.5", "expected int"),
        ("model.hidden=64.0", "expected int"),  # no silent float -> int
        ("model.hidden=true", "expected int"),  # a bool is not an int
        ("model.hidden=null", "expected int"),
        ("model.vocab_size=abc", "expected int or null"),
        ("model.vocab_size=2.5", "expected int or null"),
        ("optim.lr=abc", "expected float"),
        ("optim.lr=true", "expected float"),
        ("optim.lr=.nan", "expected float"),
        ("optim.lr=.inf", "expected float"),
        ("model.time_conditioning=1", "expected bool"),
        ("model.time_conditioning=maybe", "expected bool"),
        ("demo.steps_grid=4", "expected list of int"),
        ("demo.steps_grid=[2,4.5]", "expected list of int"),
        ("demo.steps_grid=[2,true]", "expected list of int"),
        ("optim.lr=[1", "cannot parse"),
    ],
)
def test_type_errors(override, expected):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(overrides=[override])
    assert key in str(info.value)


def test_accepted_conversions():
    cfg = load_config(
        overrides=[
            "optim.lr=1",  # int for a float field -> float
            "optim.weight_decay=2e-3",  # YAML 1.1 reads this as a string; a float field takes it
            "model.vocab_size=null",
            "demo.steps_grid=[2,4,8]",
            "model.time_conditioning=true",
            "demo.out_dir=2024",  # a str field takes the text as written
            "sampler.name=confidence",
        ]
    )
    assert isinstance(cfg.optim.lr, float) and (cfg.optim.lr, cfg.optim.weight_decay) == (1.0, 2e-3)
    assert (cfg.model.vocab_size, cfg.demo.steps_grid, cfg.model.time_conditioning) == (None, [2, 4, 8], True)
    assert (cfg.demo.out_dir, cfg.sampler.name) == ("2024", "confidence")
    assert load_config(overrides=["model.vocab_size=100"]).model.vocab_size == 100


def test_overrides_do_not_mutate_shared_defaults():
    load_config(overrides=["demo.steps_grid=[1]"])
    assert Config().demo.steps_grid == DemoConfig().steps_grid == [2, 4, 8, 16, 32]


# --- values --------------------------------------------------------------------------------


POSITIVE = [
    *(f"model.{k}" for k in ("hidden", "layers", "heads", "max_seq_len", "mlp_ratio")),
    *(f"optim.{k}" for k in ("steps", "batch_size", "lr")), "log.every", "checkpoint.every",
    *(f"demo.{k}" for k in ("proseco_steps", "mdm_step_ratio", "eval_samples")),
    *("sampler.steps", "sampler.batch_size", "data.seq_len"),
]
NON_NEGATIVE = [
    *(f"sampler.{k}" for k in ("temperature", "block_size", "corrector_start", "remdm_eta")),
    *(f"optim.{k}" for k in ("warmup_steps", "grad_clip")), "parallel.threads", "run.max_time_s",
    *("diffusion.mdm_weight", "data.puzzle_clues"),
]


@pytest.mark.parametrize(
    ("key", "bad", "rule"), [(k, 0, "> 0") for k in POSITIVE] + [(k, -1, ">= 0") for k in NON_NEGATIVE]
)
def test_range_checks(key, bad, rule):
    with pytest.raises(ConfigError, match=f"{re.escape(key)} must be {rule}, got"):
        load_config(overrides=[f"{key}={bad}"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.heads=3"], "divisible by model.heads"),
        (["model.hidden=12", "model.heads=4"], "must be even"),  # head dim 3: rotary needs even
        (["model.dropout=1.0"], "model.dropout"),
        (["model.vocab_size=1"], "model.vocab_size"),
        (["diffusion.schedule=cosine"], "diffusion.schedule must be one of"),
        (["diffusion.t_eps=0"], "diffusion.t_eps"),
        (["diffusion.t_eps=1"], "diffusion.t_eps"),
        (["diffusion.corrector_input=tokens"], "diffusion.corrector_input"),
        (["diffusion.mdm_weight=0", "diffusion.corrector_weight=0"], "both 0"),
        (["sampler.name=greedy"], "sampler.name"),
        (["sampler.nucleus_p=0"], "sampler.nucleus_p"),
        (["sampler.nucleus_p=1.5"], "sampler.nucleus_p"),
        (["sampler.corrector_steps=-1"], r"sampler\.corrector_steps \(S\) must be >= 0"),
        (["sampler.corrector_every=0"], r"sampler\.corrector_every \(omega\) must be >= 1"),
        (["sampler.remdm_strategy=clip"], "sampler.remdm_strategy"),
        (["sampler.remdm_eta=1.5"], "sampler.remdm_eta must be <= 1"),
        (["optim.beta1=1"], "optim.beta1"),
        (["optim.beta2=-0.1"], "optim.beta2"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio"),
        (["optim.ema=1"], "optim.ema"),
        (["data.task=sudoku9"], "data.task"),
        (["data.holdout_fraction=0"], "data.holdout_fraction"),
        (["data.holdout_fraction=1"], "data.holdout_fraction"),
        (["data.puzzle_clues=16"], "data.puzzle_clues"),
        (["data.seq_len=17"], r"data\.seq_len \(17\) exceeds model\.max_seq_len \(16\)"),
        (["demo.steps_grid=[]"], "demo.steps_grid"),
        (["demo.corrector_grid=[1,0]"], "demo.corrector_grid"),
    ],
)
def test_value_checks(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=overrides)


def test_edge_values_that_are_allowed():
    cfg = load_config(
        overrides=[
            "sampler.corrector_steps=0",  # S = 0: corrector off
            "sampler.corrector_every=1",
            "sampler.temperature=0",  # greedy
            "sampler.nucleus_p=1",
            "sampler.remdm_strategy=rescale",
            "sampler.remdm_eta=3",  # only capped for `cap`
            "diffusion.corrector_weight=0",  # plain MDLM
            "data.puzzle_clues=0",
            "model.max_seq_len=32",
            "data.seq_len=32",
        ]
    )
    assert cfg.sampler.corrector_steps == 0 and cfg.data.seq_len == 32


def test_validate_checks_a_directly_built_config():
    cfg = Config()
    validate(cfg)
    cfg.sampler.corrector_every = 0
    with pytest.raises(ConfigError, match="omega"):
        validate(cfg)


# --- dumping and rebuilding ----------------------------------------------------------------

NON_DEFAULT = [
    "model.hidden=128",
    "model.vocab_size=20",
    "model.dropout=0.1",
    "optim.lr=3.0e-4",
    "optim.eps=1e-10",
    "sampler.corrector_steps=2",
    "sampler.name=remdm",
    "demo.steps_grid=[2,4]",
    "demo.out_dir=runs/x y",
]


def test_to_dict_order_and_dump_load_round_trip(tmp_path):
    cfg = load_config(overrides=NON_DEFAULT)
    d = to_dict(cfg)
    assert list(d) == ["model", "diffusion", "sampler", "optim", "parallel", "checkpoint", "log",
                       "data", "prep", "eval", "cluster", "run", "demo"]
    assert list(d["model"])[:3] == ["vocab_size", "hidden", "layers"]
    assert yaml.safe_load(dump_yaml(cfg)) == d
    f = write(tmp_path / "resolved.yaml", dump_yaml(cfg))
    assert load_config(str(f)) == cfg
    assert load_config(str(write(tmp_path / "d.yaml", dump_yaml(Config())))) == Config()


def test_config_from_dict_round_trip_and_partial():
    cfg = load_config(overrides=NON_DEFAULT)
    assert config_from_dict(to_dict(cfg)) == cfg
    partial = config_from_dict({"model": {"hidden": 32}})
    assert partial.model.hidden == 32 and partial.optim == Config().optim


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"model": {"hiden": 32}}, "did you mean 'model.hidden'"),
        ({"modle": {"hidden": 32}}, "unknown section"),
        ({"model": {"hidden": "32"}}, "expected int"),
        ({"model": {"hidden": 30, "heads": 4}}, "divisible"),
        ({"model": 5}, "'model'"),
    ],
)
def test_config_from_dict_is_strict(d, expected):
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(d)


# --- presets -------------------------------------------------------------------------------


def test_tiny_preset():
    cfg = load_config(str(PRESETS / "tiny.yaml"))
    m = cfg.model
    assert (m.hidden, m.layers, m.heads, m.max_seq_len) == (64, 3, 4, 16)
    assert (cfg.data.seq_len, cfg.optim.batch_size, cfg.optim.lr) == (16, 128, pytest.approx(2e-3))
    assert cfg.demo == DemoConfig()


def test_owt_small_preset():
    cfg = load_config(str(PRESETS / "owt_small.yaml"))
    m, d, s, t = cfg.model, cfg.diffusion, cfg.sampler, cfg.optim
    assert (m.vocab_size, m.hidden, m.layers, m.heads, m.max_seq_len) == (50259, 768, 12, 12, 1024)
    assert (m.cond_dim, m.time_conditioning, m.dropout, m.tie_embeddings) == (128, False, 0.1, False)
    assert (d.t_eps, d.corrector_input, d.errors_upweighted) == (0.1, "model_outputs", True)
    assert (d.mdm_weight, d.corrector_weight) == (1.0, 1.0)
    assert (t.lr, t.beta2, t.weight_decay, t.warmup_steps) == (pytest.approx(3e-4), 0.999, 0.0, 2500)
    assert (t.schedule, t.grad_clip, t.ema, t.batch_size, t.grad_accum) == ("constant", 1.0, 0.9999, 32, 2)
    assert t.batch_size * t.grad_accum * 8 == 512  # the paper's global batch on one 8-GPU node
    assert (s.name, s.nucleus_p, s.float64, s.steps) == ("ancestral", 0.9, True, 256)
    assert (cfg.data.seq_len, cfg.data.shards) == (1024, "data/owt")


def test_presets_build_on_each_other(tmp_path):
    f = write(tmp_path / "mine.yaml", f"include: {PRESETS / 'tiny.yaml'}\nmodel: {{hidden: 128}}\n")
    cfg = load_config(str(f))
    assert cfg.model.hidden == 128 and cfg.model.layers == 3


def test_prep_section_loads_from_the_text_preset_and_checks_values():
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "text.yaml"))
    assert (cfg.prep.mode, cfg.model.vocab_size, cfg.data.task) == ("wrap", 8192, "text")
    assert cfg.prep.inputs == []
    with pytest.raises(ConfigError, match="prep.mode must be one of: wrap, pad"):
        load_config(overrides=["prep.mode=concat"])
    with pytest.raises(ConfigError, match="prep.val_fraction"):
        load_config(overrides=["prep.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="expected list of str"):
        load_config(overrides=["prep.inputs=corpus.txt"])
    assert load_config(overrides=["prep.inputs=[a.txt, 'b/*.jsonl']"]).prep.inputs == ["a.txt", "b/*.jsonl"]


# --- renamed keys --------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_KEYS.items()))
def test_an_old_key_names_its_new_place(old, new):
    with pytest.raises(ConfigError, match=f"config key '{re.escape(old)}' moved to {re.escape(new)}"):
        load_config(overrides=[f"{old}=1"])
    for target in new.split(" or "):  # every new place is a real key
        section, key = target.split(" ")[0].split(".")
        assert hasattr(getattr(Config(), section), key)


def test_a_stored_config_of_the_old_layout_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="predates the split of its train section.*does not load"):
        config_from_dict({"model": {"hidden": 32}, "train": {"lr": 1e-3}})


def test_an_old_train_section_in_a_preset_is_refused_by_key(tmp_path):
    f = write(tmp_path / "old.yaml", "train:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"'train\.lr' moved to optim\.lr.*old\.yaml"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="train section was split into optim, parallel"):
        load_config(overrides=["train.nonsense=1"])


# --- rules that need a fact known later (world size, shards, tokenizer) --------------------------


def test_rules_between_keys_are_checked_at_load():
    for overrides, message in (
        (["parallel.backend=deepspeed", "parallel.zero_stage=3", "model.tie_embeddings=true"], "tied embedding"),
        (["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.activation_checkpointing=true"],
         "activation_checkpointing=true is not supported"),
        (["parallel.tp_size=2"], "parallel.tp_size=2 needs parallel.backend=megatron"),
        (["parallel.backend=deepspeed", "parallel.distributed=ddp"], "parallel.distributed='ddp' is for"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=overrides)
    # ZeRO-3 with tied embeddings is fine for the other backends (they do not partition)
    load_config(overrides=["parallel.zero_stage=3", "model.tie_embeddings=true"])


def test_world_size_rules():
    check_world_size(load_config(overrides=["parallel.distributed=ddp"]), 2)
    with pytest.raises(ConfigError, match="--nproc must be >= 1"):
        check_world_size(Config(), 0)
    with pytest.raises(ConfigError, match="set parallel.distributed=ddp"):
        check_world_size(Config(), 2)
    megatron = load_config(overrides=["parallel.backend=megatron", "parallel.tp_size=2"])
    with pytest.raises(ConfigError, match="not divisible by parallel.tp_size=2"):
        check_world_size(megatron, 3)


def test_corpus_runs_need_the_text_task_and_prepared_shards(tmp_path):
    with pytest.raises(ConfigError, match="data.task=text.*sudoku4 task trains with `proseco demo`"):
        check_corpus_run(Config(), "proseco train")
    cfg = load_config(overrides=["data.task=text", f"data.shards={tmp_path}"])
    with pytest.raises(ConfigError, match=r"no prepared shards in .*run `proseco prep tokenizer` and then"):
        check_corpus_run(cfg, "proseco train")
    (tmp_path / "manifest.json").write_text("{}")
    check_corpus_run(cfg, "proseco train")


def test_shards_must_match_seq_len_and_fit_the_vocabulary():
    cfg = load_config(overrides=["data.seq_len=16", "model.vocab_size=100"])
    assert check_shards(cfg, 16, 90) == 100
    assert check_shards(load_config(overrides=["data.seq_len=16"]), 16, 90) == 90  # null: the data's
    with pytest.raises(ConfigError, match="set data.seq_len=32"):
        check_shards(cfg, 32, 90)
    with pytest.raises(ConfigError, match="set model.vocab_size=120"):
        check_shards(cfg, 16, 120)


def test_the_tokenizer_size_is_model_vocab_size():
    assert check_tokenizer_vocab(load_config(overrides=["model.vocab_size=512"])) == 512
    for bad in ("null", "8"):
        with pytest.raises(ConfigError, match="set model.vocab_size to at least 16"):
            check_tokenizer_vocab(load_config(overrides=[f"model.vocab_size={bad}"]))


def test_tensor_parallel_divisibility():
    model = ModelConfig(hidden=64, heads=4, mlp_ratio=4.0)
    check_tensor_parallel(model, 96, 4, world=8)
    for args, message in (((model, 96, 3, 6), "model.heads=4 is not divisible"),
                          ((model, 98, 4), "model.vocab_size=98 is not divisible"),
                          ((model, 96, 4, 6), "must be >= 1 and divide the number of processes"),
                          ((ModelConfig(hidden=36, heads=4, mlp_ratio=1.5), 96, 4), "MLP width")):
        with pytest.raises(ConfigError, match=message):
            check_tensor_parallel(*args)


def test_each_task_has_its_own_eval_options():
    from pipeline.evaluation.runner import task_options

    cfg = load_config(overrides=["eval.gsm8k_questions=q.jsonl", "eval.qm9_train_smiles=train.smi"])
    assert task_options(cfg, "gsm8k") == {"data": "q.jsonl"}
    assert task_options(cfg, "qm9") == {"train_smiles": "train.smi"}
    assert task_options(Config(), "qm9") == {}
