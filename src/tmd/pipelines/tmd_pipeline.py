"""``TMDPipeline``: a TMD student as a diffusers pipeline, called like ``WanPipeline``.

Components: ``transformer`` (the student's backbone and head, a stock ``WanTransformer3DModel`` that any
Wan tool reads), ``tmd_parts`` (:class:`TMDParts`: the inner-state block, fusion and gap embedder TMD
adds, with the split and the sampling settings in its config), and the teacher's ``vae``,
``text_encoder`` and ``tokenizer``. ``save_pretrained`` / ``from_pretrained`` write and read the folder
with its ``model_index.json``. ``__call__`` runs ``tmd.sampling.sample_tmd`` (no CFG: distillation bakes
guidance in) and decodes like ``WanPipeline``, returning a ``WanPipelineOutput``, so
``diffusers.utils.export_to_video(output.frames[0], "video.mp4", fps=16)`` works unchanged.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, ModelMixin, WanPipeline, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils import logging
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from tmd import flow
from tmd.models.folder import TMD_PARTS
from tmd.models.split import FUSIONS, OLD_GAP_BIAS, InnerStateBlock, TMDStudent, gap_embedder
from tmd.models.vae import denormalize_latents
from tmd.models.wan import load_teacher
from tmd.sampling import sample_tmd

logger = logging.get_logger(__name__)


class TMDParts(ModelMixin, ConfigMixin):
    """What a TMD student adds to its Wan transformer, and how it samples by default. (The config says
    ``fusion_type``: a config key named like a submodule would shadow it.)"""

    _keep_in_fp32_modules = ["gap_embedder"]  # fed the float32 sinusoidal projection, as in TMDStudent
    _keys_to_ignore_on_load_unexpected = [OLD_GAP_BIAS.replace(".", "\\.")]

    @register_to_config
    def __init__(
        self,
        dim: int,
        freq_dim: int,
        eps: float = 1e-6,
        head_blocks: int = 5,
        fusion_type: str = "gated",
        inner_velocity: str = "noise",
        transition_target: str = "difference",
        num_outer_steps: int = 2,
        num_inner_steps: int = 4,
        outer_shift: float = flow.OUTER_SHIFT,
        inner_shift: float = flow.INNER_SHIFT,
    ):
        super().__init__()
        if fusion_type not in FUSIONS:
            raise ValueError(f"unknown fusion_type {fusion_type!r}; choose one of {sorted(FUSIONS)}")
        flow.check_inner_velocity(inner_velocity)
        flow.check_transition_target(transition_target)
        self.inner_block = InnerStateBlock(dim, eps=eps)
        self.fusion = FUSIONS[fusion_type](dim)
        self.gap_embedder = gap_embedder(freq_dim, dim)

    @classmethod
    def from_student(cls, student: TMDStudent, **sampling) -> TMDParts:
        """The parts of ``student`` (copied), with sampling defaults (``num_outer_steps``, ...) in the config."""
        config = student.transformer.config
        parts = cls(
            dim=config.num_attention_heads * config.attention_head_dim,
            freq_dim=config.freq_dim,
            eps=config.eps,
            head_blocks=student.head_blocks,
            fusion_type=student.fusion_kind,
            inner_velocity=student.inner_velocity,
            transition_target=student.transition_target,
            **sampling,
        )
        for name in TMD_PARTS:
            source = getattr(student, name)
            getattr(parts, name).to(next(source.parameters()).dtype).load_state_dict(source.state_dict())
        return parts


class TMDPipeline(WanPipeline):
    """Text-to-video with a TMD student: ``M`` outer steps, each one backbone pass and ``N`` flow-head steps.

    A ``WanPipeline`` subclass for its prompt encoding, latent preparation and decoding; the sampler is
    TMD's. Load with ``TMDPipeline.from_pretrained(folder)`` (a folder ``tmd export --format pipeline``
    writes, or one saved with ``save_pretrained``).
    """

    model_cpu_offload_seq = "text_encoder->transformer->tmd_parts->vae"
    _optional_components: list[str] = []

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        transformer: WanTransformer3DModel,
        tmd_parts: TMDParts,
    ):
        DiffusionPipeline.__init__(self)
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, tmd_parts=tmd_parts
        )
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    def student(self) -> TMDStudent:
        """The TMD student over this pipeline's own transformer and parts (shared, not copied)."""
        config = self.tmd_parts.config
        parts = {name: getattr(self.tmd_parts, name) for name in TMD_PARTS}
        return TMDStudent.from_modules(
            self.transformer, parts, config.head_blocks, config.fusion_type, config.inner_velocity, config.transition_target
        ).eval()

    def _check_sizes(self, height: int, width: int, num_frames: int) -> None:
        temporal, spatial = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be {temporal} k + 1 for the Wan VAE (e.g. 81), got {num_frames}")
        _, patch_h, patch_w = self.transformer.config.patch_size
        for name, size, patch in (("height", height, patch_h), ("width", width, patch_w)):
            if size < 1 or size % (spatial * patch):
                raise ValueError(f"{name} must be a positive multiple of {spatial * patch} (VAE x patch size), got {size}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_outer_steps: int | None = None,
        num_inner_steps: int | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int = 512,
    ) -> WanPipelineOutput | tuple:
        """Generate videos; arguments as ``WanPipeline.__call__``'s, with ``num_outer_steps`` (M) and
        ``num_inner_steps`` (N) in place of ``num_inference_steps`` (defaults: ``tmd_parts``' config).

        ``negative_prompt`` is accepted so that WanPipeline scripts run, and unused: a distilled student
        samples without CFG. ``generator`` draws the initial latents (unless ``latents`` are given) and
        then each outer step's inner noise; on another device than the pipeline's it seeds a generator there.
        """
        config = self.tmd_parts.config
        outer = config.num_outer_steps if num_outer_steps is None else num_outer_steps
        inner = config.num_inner_steps if num_inner_steps is None else num_inner_steps
        if negative_prompt is not None:
            logger.warning("negative_prompt is not used: a TMD student samples without classifier-free guidance")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        self._check_sizes(height, width, num_frames)
        device = self._execution_device
        prompt_embeds, _ = self.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        latents = self.prepare_latents(
            prompt_embeds.shape[0],
            self.transformer.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )
        video = sample_tmd(
            self.student(),
            latents,
            prompt_embeds,
            outer,
            inner,
            _on_device(generator, device),
            outer_shift=config.outer_shift,
            inner_shift=config.inner_shift,
        )
        if output_type != "latent":
            video = self._decode(video, output_type)
        self.maybe_free_model_hooks()
        return WanPipelineOutput(frames=video) if return_dict else (video,)

    def _decode(self, latents: torch.Tensor, output_type: str):
        video = self.vae.decode(denormalize_latents(self.vae, latents.to(self.vae.device, self.vae.dtype)), return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)


def _on_device(generator: torch.Generator | list[torch.Generator] | None, device: torch.device) -> torch.Generator | None:
    """The generator for the inner noise: ``generator`` itself on ``device``, else one seeded from it there."""
    if isinstance(generator, list):
        generator = generator[0]
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def load_student(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> TMDStudent:
    """The TMD student of a ``TMDPipeline`` folder, without loading its VAE and text encoder."""
    from pathlib import Path

    path = Path(path)
    parts = TMDParts.from_pretrained(path / "tmd_parts", torch_dtype=dtype)
    config = parts.config
    student = TMDStudent.from_modules(
        load_teacher(path / "transformer", dtype=dtype).transformer,
        {name: getattr(parts, name) for name in TMD_PARTS},
        config.head_blocks,
        config.fusion_type,
        config.inner_velocity,
        config.transition_target,
    )
    return student.to(device).eval()
