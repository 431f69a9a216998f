"""The one reader of params.yaml: typed sections, overrides, and errors that name the key.

Models declare types and ranges but no defaults: every default lives in params.yaml, so a
missing key fails loudly instead of silently taking a value from code.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

DEFAULT_PATH = Path("params.yaml")
TOO_DEEP = "nested too deeply to read (past Python's recursion limit; params are only a few levels deep)"


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as 3e-3 (PyYAML's 1.1 rules make them strings)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


class ParamsError(ValueError):
    """Params that cannot be used: the message names the file, the key and what was expected."""


class Section(BaseModel):
    """Base of every params section: strict types, unknown keys rejected, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MissingSection(ParamsError, AttributeError):
    """A registered plug-in family whose section params.yaml lacks."""


class FamilyGroup(Section):
    """A params group with a section per model family (models, train, sweep).

    The built-in families are fields; a plug-in family's section (pipeline/families.py) is an extra key,
    validated by the family's own schema. Any other extra key is an error naming it.
    """

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    GROUP: ClassVar[str]

    @classmethod
    def plug_in_schema(cls, name: str) -> type[BaseModel]:
        """The schema of plug-in family `name`'s section in this group; ValueError if no such family."""
        from pipeline.families import BUILT_IN, FAMILIES  # here, not above: a plug-in's module imports this one

        if name not in FAMILIES or name in BUILT_IN:
            raise ValueError(f"{cls.GROUP}.{name}: unknown key (neither a setting nor a model family; "
                             f"families: {', '.join(FAMILIES)})")
        return SweepFamilyParams if cls.GROUP == "sweep" else FAMILIES[name].schema(cls.GROUP)

    @model_validator(mode="after")
    def _plug_in_sections(self) -> FamilyGroup:
        for name, raw in list((self.__pydantic_extra__ or {}).items()):
            schema = self.plug_in_schema(name)
            try:
                self.__pydantic_extra__[name] = schema.model_validate(raw)
            except ValidationError as err:
                raise ValueError("; ".join(f"{self.GROUP}.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in err.errors())) from None
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            raise MissingSection(f"params: no {self.GROUP}.{name} section (a model family needs models.{name}, "
                                 f"train.{name} and sweep.{name} in params.yaml)") from None

    def families(self) -> list[str]:
        """The names of the family sections it holds, built-in first."""
        built_in = [n for n, f in type(self).model_fields.items() if isinstance(getattr(self, n), BaseModel)]
        return built_in + list(self.__pydantic_extra__ or {})


class PathsParams(Section):
    sample: str
    coco: str
    text: str
    vocab: str
    encoded: str
    embeddings: str
    features: str
    models: str
    sweeps: str
    evaluation: str
    ray_storage: str
    metrics: str
    reports: str


class CocoSourceParams(Section):
    annotations: str
    images: str
    val_annotations: str | None
    val_images: str | None

    @model_validator(mode="after")
    def _val_pair(self) -> CocoSourceParams:
        if (self.val_annotations is None) != (self.val_images is None):
            raise ValueError("val_annotations and val_images must be given together (or both null)")
        return self


class TextSourceParams(Section):
    files: list[str]


class DataParams(Section):
    coco: CocoSourceParams
    text: TextSourceParams


class SampleParams(Section):
    images: int = Field(ge=3)
    image_size: int = Field(ge=32, le=1024)
    jpeg_quality: int = Field(ge=10, le=100)
    min_shapes: int = Field(ge=1, le=3)
    max_shapes: int = Field(ge=1, le=3)

    @model_validator(mode="after")
    def _shape_range(self) -> SampleParams:
        if self.min_shapes > self.max_shapes:
            raise ValueError("min_shapes must be <= max_shapes")
        return self


class CocoSplitParams(Section):
    val: int = Field(ge=0)
    test: int = Field(ge=0)


class PrepareCocoParams(Section):
    image_size: int = Field(ge=16, le=1024)
    split: CocoSplitParams
    max_skipped_fraction: float = Field(ge=0.0, le=1.0)
    workers: int = Field(ge=0, le=512)
    chunk_size: int = Field(ge=1, le=100_000)
    max_caption_tokens: int = Field(ge=1)
    max_image_bytes: int = Field(ge=1)
    max_image_pixels: int = Field(ge=1, le=89_478_485)  # at most Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS)


class TextSplitParams(Section):
    val: float = Field(gt=0.0, lt=0.5)
    test: float = Field(gt=0.0, lt=0.5)


class PrepareTextParams(Section):
    split: TextSplitParams
    lowercase_words: bool


class VocabParams(Section):
    sources: list[Literal["captions", "text"]] = Field(min_length=1)
    min_freq: int = Field(ge=1)
    max_size: int = Field(ge=5)
    char_min_freq: int = Field(ge=1)


class EmbeddingsParams(Section):
    pretrained: Literal["glove-6b-50d"] | None
    dim: int = Field(ge=2, le=1024)
    window: int = Field(ge=1, le=50)
    negatives: int = Field(ge=1, le=100)
    subsample: float = Field(gt=0.0, le=1.0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0.0, le=10.0)
    probe_words: list[str]
    neighbours: int = Field(ge=1, le=100)

    @model_validator(mode="after")
    def _glove_dim(self) -> EmbeddingsParams:
        if self.pretrained == "glove-6b-50d" and self.dim != 50:
            raise ValueError(f"dim must be 50 with pretrained glove-6b-50d (got {self.dim})")
        return self


class FeaturesParams(Section):
    enabled: bool
    batch_size: int = Field(ge=1, le=65_536)
    dtype: Literal["float16", "float32"]


# The captioner keys a feature file depends on: a sweep that varies one would train on stale features.
FEATURE_KEYS = ("encoder", "encoder_weights", "freeze_encoder", "finetune_blocks")


class CaptionerParams(Section):
    arch: Literal["show_tell", "show_attend_tell", "transformer"]
    encoder: Literal["small_cnn", "efficientnet_lite0", "resnet18", "resnet50"]
    encoder_weights: str | None
    freeze_encoder: bool
    finetune_blocks: int = Field(ge=0)
    encoder_lr: float = Field(gt=0.0, le=10.0)
    embed_size: int = Field(ge=2, le=8192)
    hidden_size: int = Field(ge=2, le=16384)
    attention: Literal["additive", "dot", "general"]
    attention_size: int = Field(ge=1, le=8192)
    attention_reg: float = Field(ge=0.0)
    layers: int = Field(ge=1, le=64)
    heads: int = Field(ge=1, le=128)
    ff_size: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    max_len: Annotated[int, Field(ge=2, le=512)] | Literal["auto"]  # auto: from the training captions' lengths
    pretrained_embeddings: bool

    @model_validator(mode="after")
    def _heads_divide(self) -> CaptionerParams:
        if self.arch == "transformer" and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        return self


class LstmLmParams(Section):
    level: Literal["char", "word"]
    cell: Literal["lstm", "gru"]
    embed_size: int = Field(ge=2, le=8192)
    hidden_size: int = Field(ge=2, le=16384)
    layers: int = Field(ge=1, le=64)
    dropout: float = Field(ge=0.0, lt=1.0)
    tie_weights: bool
    pretrained_embeddings: bool

    @model_validator(mode="after")
    def _tying(self) -> LstmLmParams:
        if self.tie_weights and self.embed_size != self.hidden_size:
            raise ValueError(f"tie_weights needs embed_size == hidden_size "
                             f"(got {self.embed_size} and {self.hidden_size})")
        return self


class TransformerLmParams(Section):
    level: Literal["char", "word"]
    d_model: int = Field(ge=2, le=16384)
    layers: int = Field(ge=1, le=128)
    heads: int = Field(ge=1, le=256)
    ff_size: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    context: int = Field(ge=2, le=65536)
    positions: Literal["learned", "sinusoidal"]  # learned table (GPT-2) | fixed sin/cos on sqrt(d)-scaled tokens
    bias: bool  # biases in every Linear and LayerNorm
    pretrained_embeddings: bool

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerLmParams:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        return self


class ModelsParams(FamilyGroup):
    GROUP = "models"
    captioner: CaptionerParams
    lstm_lm: LstmLmParams
    transformer_lm: TransformerLmParams


class OptimParams(Section):
    """The optimisation settings every family has."""

    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"]
    lr: float = Field(gt=0.0, le=10.0)
    weight_decay: float = Field(ge=0.0, le=1.0)
    momentum: float = Field(ge=0.0, lt=1.0)
    beta1: float = Field(ge=0.0, lt=1.0)
    beta2: float = Field(ge=0.0, lt=1.0)
    schedule: Literal["constant", "inverse_time", "exponential", "cosine"]
    warmup_fraction: float = Field(ge=0.0, lt=1.0)  # of all optimizer steps (max_epochs x steps per epoch)
    decay_rate: float = Field(ge=0.0)
    gamma: float = Field(gt=0.0, le=1.0)
    max_epochs: int = Field(ge=1)
    epoch_fraction: float = Field(gt=0.0, le=1.0)
    batch_size: int = Field(ge=1)
    clip_grad_norm: float = Field(ge=0.0)
    early_stopping_patience: int = Field(ge=0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)


class CaptionerTrainParams(OptimParams):
    scheduled_sampling: list[float] = Field(min_length=2, max_length=2)
    scst_epochs: int = Field(ge=0)  # self-critical epochs after the max_epochs of cross-entropy; 0: off
    scst_lr: float = Field(gt=0.0, le=10.0)  # their constant learning rate

    @model_validator(mode="after")
    def _probabilities(self) -> CaptionerTrainParams:
        if not all(0.0 <= p <= 1.0 for p in self.scheduled_sampling):
            raise ValueError(f"scheduled_sampling probabilities must lie in [0, 1] "
                             f"(got {list(self.scheduled_sampling)})")
        return self


class LstmLmTrainParams(OptimParams):
    bptt: int = Field(ge=2, le=65536)


class TransformerLmTrainParams(OptimParams):
    min_lr_fraction: float = Field(ge=0.0, le=1.0)  # cosine: decays from lr to min_lr_fraction x lr (0: to 0)


class TrainParams(FamilyGroup):
    GROUP = "train"
    accelerator: Literal["auto", "cpu", "gpu"]
    devices: int = Field(ge=1)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
    compile: bool
    num_workers: int = Field(ge=0, le=256)
    bucket_by_length: bool
    group_by_image: bool
    log_every_n_steps: int = Field(ge=1)
    captioner: CaptionerTrainParams
    lstm_lm: LstmLmTrainParams
    transformer_lm: TransformerLmTrainParams

    @model_validator(mode="after")
    def _one_batching(self) -> TrainParams:
        if self.bucket_by_length and self.group_by_image:
            raise ValueError("bucket_by_length and group_by_image are both true: a captioner batch is either "
                             "captions of similar length or every caption of a few images; set one to false")
        return self


class EvaluateParams(Section):
    beam_size: int = Field(ge=1, le=100)
    alpha: float = Field(ge=0.0, le=5.0)
    batch_size: int = Field(ge=1)
    meteor: bool
    temperatures: list[float] = Field(min_length=1)
    sample_length: int = Field(ge=1)
    no_repeat_ngram: int = Field(ge=0)  # 0: off
    rerank_neighbours: int = Field(ge=0)  # 0: off
    rerank_weight: float = Field(ge=0.0)
    captioner_ensemble: list[str]  # extra checkpoints decoded with the evaluated captioner; []: none


class ServeParams(Section):
    max_records: int = Field(ge=1, le=10_000)
    max_image_pixels: int = Field(ge=1, le=89_478_485)  # at most Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS)
    temperature: float = Field(gt=0.0, le=10.0)
    max_request_bytes: int = Field(ge=1024)  # the server's cap on a request body, not part of the model


class RuntimeParams(Section):
    threads: int | None = Field(ge=1)  # None: the cores this process may use


class TrackingParams(Section):
    uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)



class ReportParams(Section):
    test_images: int = Field(ge=0, le=1000)
    attention_images: int = Field(ge=0, le=1000)
    prompt: str
    projection_words: int = Field(ge=0, le=100_000)
    log_to_mlflow: bool

    @model_validator(mode="after")
    def _attention_subset(self) -> ReportParams:
        if self.attention_images > self.test_images:
            raise ValueError(f"attention_images ({self.attention_images}) must be <= test_images "
                             f"({self.test_images}): strips are drawn for captioned images only")
        return self

DOMAINS = ("loguniform", "one_minus_loguniform", "uniform", "randint", "choice")
LOG_DOMAINS = ("loguniform", "one_minus_loguniform")  # sampled, and plotted, on log axes


def check_domain(key: str, spec: Any) -> None:
    """A search-space entry: exactly one known domain with valid bounds, else ValueError naming the key."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ValueError(f"{key}: expected one of {{{', '.join(DOMAINS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"{key}: choice needs a non-empty list, got {args!r}")
        return
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)):
        raise ValueError(f"{key}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ValueError(f"{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind in ("loguniform", "one_minus_loguniform") and low <= 0:
        raise ValueError(f"{key}: {kind} needs low > 0, got {low}")
    if kind == "one_minus_loguniform" and high >= 1:
        raise ValueError(f"{key}: one_minus_loguniform bounds 1 - value, so high must be < 1, got {high}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{key}: randint needs integer bounds, got {args!r}")


def domain_values(kind: str, args: list) -> list:
    """The values a domain can give that a field must accept: every choice, or both ends of the range."""
    if kind == "choice":
        return list(args)
    low, high = args
    if kind == "randint":
        return [low, high - 1]  # high is exclusive
    if kind == "one_minus_loguniform":
        return [1.0 - high, 1.0 - low]  # the bounds are of 1 - value
    return [float(low), float(high)]  # continuous domains sample floats, even between integer bounds


@functools.cache
def field_adapter(key: str) -> TypeAdapter:
    """A validator of the single params field at dotted `key`: its type and range, not its section's checks."""
    model: type[BaseModel] = Params
    *sections, name = key.split(".")
    for section in sections:
        if section not in model.model_fields and issubclass(model, FamilyGroup):  # a plug-in family's section
            model = model.plug_in_schema(section)
        else:
            model = model.model_fields[section].annotation
    info = model.model_fields[name]
    annotation = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return TypeAdapter(annotation, config=ConfigDict(strict=True))


def check_space_values(where: str, key: str, spec: dict[str, Any]) -> None:
    """Every value the search space `spec` can give must be valid for the field it tunes (ValueError naming both)."""
    kind, args = next(iter(spec.items()))
    adapter = field_adapter(key)
    for value in domain_values(kind, args):
        try:
            adapter.validate_python(value)
        except ValidationError as err:
            first = err.errors()[0]
            hint = "; use randint or choice for an integer" if first["type"] == "int_type" else ""
            raise ValueError(f"{where}: {kind} {args} can give {value!r}, which {key} does not accept: "
                             f"{first['msg']}{hint}") from None


class SweepFamilyParams(Section):
    num_samples: int = Field(ge=1)
    max_concurrent: int = Field(ge=0)
    max_epochs: int = Field(ge=1)
    epoch_fraction: float = Field(gt=0.0, le=1.0)
    grace_period: int = Field(ge=1)
    reduction_factor: int = Field(ge=2)
    num_workers: int = Field(ge=1, le=1024)
    use_gpu: bool
    cpus_per_worker: float = Field(gt=0)
    gpus_per_worker: float = Field(ge=0)
    max_failures: int = Field(ge=0)
    space: dict[str, Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _domains(self) -> SweepFamilyParams:
        for key, spec in self.space.items():
            check_domain(f"space.{key}", spec)
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_epochs ({self.max_epochs})")
        if self.use_gpu != (self.gpus_per_worker > 0):
            raise ValueError("use_gpu and gpus_per_worker > 0 go together")
        return self


class SweepParams(FamilyGroup):
    GROUP = "sweep"
    ray_address: str | None
    captioner: SweepFamilyParams
    lstm_lm: SweepFamilyParams
    transformer_lm: SweepFamilyParams


def _lookup(tree: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


class Params(Section):
    """The whole of params.yaml."""

    seed: int = Field(ge=0, lt=2**32)  # numpy and Lightning's seed_everything take 32-bit seeds
    paths: PathsParams
    data: DataParams
    sample: SampleParams
    prepare_coco: PrepareCocoParams
    prepare_text: PrepareTextParams
    vocab: VocabParams
    embeddings: EmbeddingsParams
    features: FeaturesParams
    models: ModelsParams
    train: TrainParams
    evaluate: EvaluateParams
    serve: ServeParams
    tracking: TrackingParams
    sweep: SweepParams
    report: ReportParams
    runtime: RuntimeParams

    @model_validator(mode="after")
    def _space_keys_exist(self) -> Params:
        tree = self.model_dump(mode="json")
        for family in self.sweep.families():  # one section per model family (pipeline/families.py)
            for key in getattr(self.sweep, family).space:
                if not _lookup(tree, key) or key.startswith("sweep."):
                    raise ValueError(f"sweep.{family}.space.{key}: no such params key to search over")
                if not (key.startswith((f"models.{family}.", f"train.{family}.")) or key == "seed"):
                    raise ValueError(f"sweep.{family}.space.{key}: a {family} sweep may only vary "
                                     f"models.{family}.*, train.{family}.* or seed")
                check_space_values(f"sweep.{family}.space.{key}", key, getattr(self.sweep, family).space[key])
        return self

    @model_validator(mode="after")
    def _features_need_a_fixed_encoder(self) -> Params:
        if not self.features.enabled:
            return self
        c, needs = self.models.captioner, []
        if not c.freeze_encoder:
            needs.append("models.captioner.freeze_encoder: true (got false)")
        if c.finetune_blocks:
            needs.append(f"models.captioner.finetune_blocks: 0 (got {c.finetune_blocks})")
        if c.encoder == "small_cnn":
            needs.append("a pretrained models.captioner.encoder (got small_cnn, which starts from random weights)")
        swept = [k for k in self.sweep.captioner.space if k in {f"models.captioner.{f}" for f in FEATURE_KEYS}]
        if swept:
            needs.append(f"no encoder keys in sweep.captioner.space (got {', '.join(swept)})")
        if needs:
            raise ValueError(f"features.enabled: true needs {'; '.join(needs)}: a feature file is only valid "
                             f"for an encoder that never changes")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for logging and hashing)."""
        return self.model_dump(mode="json")

    def overridden(self, overrides: Mapping[str, Any] | Iterable[str], source: str = "params") -> Params:
        """A copy with dotted-key overrides applied, validated like params.yaml (errors name `source` and the key)."""
        return validate_params(apply_overrides(self.to_dict(), overrides, source=source), source=source)


def flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as {dotted key: leaf value} (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key != "space":
            out.update(flatten_keys(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def load_params(
    path: str | Path = DEFAULT_PATH,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Params:
    """Read params.yaml, apply dotted-key overrides, validate; raise ParamsError naming the key."""
    path = Path(path)
    try:
        raw = _yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root, or pass --params)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ParamsError(f"{path}: {TOO_DEEP}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return validate_params(apply_overrides(raw, overrides or {}, source=str(path)), source=str(path))


def validate_params(raw: Mapping[str, Any], source: str = "params") -> Params:
    """Validate a nested dict into Params; errors list every bad key with what was expected."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, source)) from None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: what was expected (got value)`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(part) for part in e["loc"])
        if e["type"] == "extra_forbidden":
            what = "unknown key (not in params.yaml's schema; check the spelling)"
        elif e["type"] == "missing":
            what = "missing key (every default lives in params.yaml)"
        elif e["type"] == "value_error":  # our own checks: the message names what was wrong
            what = e["msg"].removeprefix("Value error, ")
        else:
            shown = repr(e.get("input"))
            what = e["msg"] + (f" (got {shown})" if len(shown) <= 80 else "")
        if not key or what.startswith(f"{key}."):  # a message naming the full key itself (a plug-in's section)
            lines.append(f"{source}: {what}")
        else:
            lines.append(f"{source}: {key}: {what}")
    if len(lines) == 1:  # the usual case: one line, as every known error reaches the user
        return f"invalid params: {lines[0]}"
    return "invalid params:\n  " + "\n  ".join(lines)


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings; values are YAML (so 3 is an int, [a, b] a list, null None)."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {item!r}: expected key=value, e.g. vocab.min_freq=2")
        try:
            out[key.strip()] = _yaml(value)
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {key}: value is not valid YAML: {err}") from None
        except RecursionError:
            raise ParamsError(f"--set {key}: value {TOO_DEEP}") from None
    return out


def apply_overrides(
    raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str], source: str = "params"
) -> dict[str, Any]:
    """Return a copy of `raw` with dotted keys replaced; a key that does not exist is an error."""
    if not isinstance(overrides, Mapping):
        overrides = parse_assignments(overrides)
    merged = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = merged
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                prefix = ".".join(parts[: depth + 1])
                raise ParamsError(f"{source}: override {dotted}: no section {prefix!r} in params")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ParamsError(f"{source}: override {dotted}: unknown key (not in params)")
        node[parts[-1]] = copy.deepcopy(value)
    return merged
