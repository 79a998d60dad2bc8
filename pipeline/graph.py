"""The stage graph, declared once: the only module that knows the order of the stages.

    fresh shards:      read -> download -> decode -> shard -> tokenize ─┐
    committed shards:  reread -> tokenize ──────────────────────────────┴─> embed -> write
    (download only:    read -> download -> decode -> shard)

The job (pipeline/job.py), ``clipcurate download`` and both schedulers (pipeline/schedulers/)
use this list; a scheduler runs consecutive stages that are not ``stateful`` together, one
task (or local worker) per shard, and each stateful stage (embed) in long-lived workers of
its own. How a stage runs (resources, batch size, concurrency, stateful, io_bound,
offloaded) is declared on the stage itself (pipeline/stages/base.py).

"Committed shards" are shards an earlier run wrote but did not embed (it died in between);
they take the reread path, the only one that reads a run's own tars back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clip_model.config import PreprocessConfig
from pipeline.blocklist import BlocklistSpec
from pipeline.config import DownloadJobConfig, EmbedConfig, FilterConfig, WriteConfig
from pipeline.stages.base import Resources, Stage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.download import DownloadStage
from pipeline.stages.read import ReadStage
from pipeline.stages.shard import ShardStage


@dataclass(frozen=True)
class ModelSpec:
    """What the CPU stages and the embed stage need to know about the embedding model, made
    in the driver from the loaded model (:func:`model_spec`): plain data, no torch.

    ``preprocess``: its image preprocessing; ``tokenizer``: its picklable, torch-free
    tokenizer (``token_ids``, ``pad_id``); ``dim``: embedding size; ``model_id``: the id rows
    record; ``moderation``: prepared moderation (pipeline/stages/moderate.py) or None."""

    preprocess: PreprocessConfig
    tokenizer: Any
    dim: int
    model_id: str
    moderation: Any = None


def model_spec(model: Any, moderation: Any = None) -> ModelSpec:
    """The :class:`ModelSpec` of a loaded clip_model model."""
    from pipeline.stages.embed import embed_dim, model_id

    return ModelSpec(model.preprocess_cfg, model.tokenizer, embed_dim(model), model_id(model), moderation)


@dataclass
class Graph:
    """Stage lists: ``sources`` by name (each applied to its own shard descriptors, in
    order), then ``tail`` applied to what every source produced. Empty lists are allowed."""

    sources: dict[str, list[Stage]]
    tail: list[Stage] = field(default_factory=list)

    def stages(self) -> Iterator[Stage]:
        for stages in self.sources.values():
            yield from stages
        yield from self.tail


@dataclass(frozen=True)
class Segment:
    """Consecutive stages one process runs on one item: either non-stateful stages fused
    into one task, or a single stateful stage in its own long-lived workers."""

    stages: tuple[Stage, ...]

    @property
    def stateful(self) -> bool:
        return any(s.stateful for s in self.stages)

    @property
    def long_lived(self) -> bool:
        """Run in long-lived workers (actors on Ray Data): stateful, or a stage asks for it."""
        return any(s.stateful or s.long_lived for s in self.stages)

    @property
    def resources(self) -> Resources:
        """What the fused task asks for: the most any of its stages needs."""
        return Resources(
            num_cpus=max((s.resources.num_cpus for s in self.stages), default=0.0),
            num_gpus=max((s.resources.num_gpus for s in self.stages), default=0.0),
        )

    @property
    def concurrency(self) -> int | tuple[int, int] | None:
        """The tightest declared limit of its stages (None: none declared)."""
        limits = [s.concurrency for s in self.stages if s.concurrency is not None]
        if not limits:
            return None
        if self.stateful:
            return limits[0]
        return min(c[1] if isinstance(c, tuple) else c for c in limits)

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.stages)

    @property
    def io_bound_prefix(self) -> int:
        """How many leading stages mostly wait on the network (a local worker runs them for
        the next item while it computes the rest of the current one)."""
        k = 0
        while k < len(self.stages) and self.stages[k].io_bound:
            k += 1
        return k

    @property
    def offloaded_end(self) -> int:
        """End of the run of ``offloaded`` stages right after the network-bound prefix (equal
        to :attr:`io_bound_prefix` when there is none): a local worker runs them for the next
        item on a thread of their own, between the fetch thread and its main thread."""
        k = self.io_bound_prefix
        while k < len(self.stages) and self.stages[k].offloaded:
            k += 1
        return k


def segments(stages: list[Stage]) -> list[Segment]:
    """``stages`` cut into :class:`Segment`: runs of non-stateful stages, and each stateful
    stage alone."""
    out: list[Segment] = []
    run: list[Stage] = []
    for s in stages:
        if s.stateful:
            if run:
                out.append(Segment(tuple(run)))
                run = []
            out.append(Segment((s,)))
        else:
            run.append(s)
    if run:
        out.append(Segment(tuple(run)))
    return out


def download_stages(cfg: DownloadJobConfig, model: ModelSpec | None = None, thumbnails: bool = False,
                    decode_isolation: bool = True, decode_cpus: float = 1.0) -> list[Stage]:
    """read -> download -> decode -> shard (-> tokenize, with a model): the fresh-shard
    source. With ``model`` the decode stage also makes the model's input (decode once). For an
    img2dataset output (``read.input_format``) the unpack stage reads the images from its tars
    in the download stage's place."""
    lists = BlocklistSpec(cfg.blocklist, cfg.storage)
    fetch: Stage
    if cfg.read.input_format == "img2dataset":
        from pipeline.stages.unpack import UnpackStage

        fetch = UnpackStage(max_bytes=cfg.download.max_bytes, storage=cfg.storage, blocklist=lists)
    else:
        fetch = DownloadStage(config=cfg.download, blocklist=lists, resources=Resources(num_cpus=0))
    stages: list[Stage] = [
        ReadStage(cfg=cfg.read, number_sample_per_shard=cfg.shard.number_sample_per_shard,
                  storage=cfg.storage, resources=Resources(num_cpus=0.1)),
        fetch,
        DecodeStage(cfg=cfg.decode, model_input=model.preprocess if model else None,
                    thumbnails=thumbnails and model is not None, isolate=decode_isolation,
                    blocklist=lists, resources=Resources(num_cpus=decode_cpus)),
        ShardStage(cfg=cfg.shard, storage=cfg.storage, passthrough=tuple(cfg.read.passthrough)),
    ]
    if model is not None:
        from pipeline.stages.tokenize import TokenizeStage

        stages.append(TokenizeStage(tokenizer=model.tokenizer))
    return stages


def build_download_graph(cfg: DownloadJobConfig, decode_isolation: bool = True, decode_cpus: float = 1.0) -> Graph:
    """The download half alone (``clipcurate download``): shards, no model."""
    return Graph({"download": download_stages(cfg, decode_isolation=decode_isolation, decode_cpus=decode_cpus)})


def build_job_graph(
    cfg: DownloadJobConfig,
    model: ModelSpec,
    embed: EmbedConfig,
    write: WriteConfig,
    filters: FilterConfig,
    thumbnails: bool = False,
    decode_isolation: bool = True,
    decode_cpus: float = 1.0,
) -> Graph:
    """The whole streaming graph of the job."""
    from pipeline.stages.embed import EmbedStage
    from pipeline.stages.reread import RereadStage
    from pipeline.stages.tokenize import TokenizeStage
    from pipeline.stages.write import WriteStage

    fresh = download_stages(cfg, model, thumbnails, decode_isolation, decode_cpus)
    reread = [
        RereadStage(read=cfg.read, number_sample_per_shard=cfg.shard.number_sample_per_shard,
                    shard_folder=cfg.shard.output_folder, storage=cfg.storage,
                    model_input=model.preprocess, thumbnails=thumbnails, stored_decode=embed.stored_decode,
                    resources=Resources(num_cpus=decode_cpus)),
        TokenizeStage(tokenizer=model.tokenizer),
    ]
    embed_stage = EmbedStage(
        cfg=embed,
        preprocess=model.preprocess,
        pad_id=int(model.tokenizer.pad_id),
        moderation=model.moderation,
        thumbnails=thumbnails and embed.stored_decode == "device",
        resources=Resources(num_cpus=embed.num_cpus, num_gpus=embed.num_gpus or 0.0),
        concurrency=embed.concurrency,
    )
    rules = model.moderation.rules if model.moderation is not None else None
    tail: list[Stage] = [
        embed_stage,
        WriteStage(cfg=write, storage=cfg.storage, filters=filters, rules=rules, dim=model.dim),
    ]
    return Graph({"download": fresh, "reread": reread}, tail)


__all__ = [
    "Graph",
    "ModelSpec",
    "Segment",
    "build_download_graph",
    "build_job_graph",
    "download_stages",
    "model_spec",
    "segments",
]
