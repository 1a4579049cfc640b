"""The run configuration's schema: plain dataclasses, one per section.

Every field has a type and a default; a field with a fixed set of values is a
``typing.Literal``, the one place those values are written (loading accepts
any string there and ``validate`` names the valid ones). Loading from YAML
lives in megavl/config/loading.py, the cross-field checks in checks.py.
"""

from dataclasses import dataclass, field, fields
from typing import Literal, Optional, get_args

__all__ = [
    "lm_head_dim",
    "VisionConfig",
    "WindowStageConfig",
    "VisionKind",
    "VISION_KINDS",
    "AdapterConfig",
    "AdapterKind",
    "ADAPTER_KINDS",
    "AdapterNorm",
    "ADAPTER_NORMS",
    "ImagePositions",
    "IMAGE_POSITIONS",
    "MoEConfig",
    "VisionLoRAConfig",
    "LMConfig",
    "ModelConfig",
    "ParallelConfig",
    "PerfConfig",
    "ResolutionConfig",
    "MaxPixelScheduleConfig",
    "DataConfig",
    "PartConfig",
    "TrainablePartsConfig",
    "TRAINABLE_PARTS",
    "TrainConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "Config",
    "RopeKind",
    "MoEDispatcher",
    "ImageAttention",
    "DType",
    "VisionNorm",
    "VisionMLP",
    "PositionInterpolation",
    "POSITION_INTERPOLATIONS",
    "ResolutionMode",
    "FixedFit",
    "ImageBackendName",
    "ROPE_KINDS",
    "MOE_DISPATCHERS",
    "IMAGE_ATTENTION_KINDS",
    "DTYPES",
    "VISION_NORMS",
    "VISION_MLPS",
    "RESOLUTION_MODES",
    "FIXED_FITS",
    "IMAGE_BACKENDS",
    "MropeLayout",
    "DecodePlace",
    "DECODE_PLACES",
    "ResumeMode",
    "RESUME_MODES",
    "Stage",
    "STAGES",
    "LossScope",
    "LOSS_SCOPES",
    "OptimizerName",
    "LayerBackend",
    "MuonTPMode",
    "MuonScaleMode",
    "MuonConfig",
    "TaskEvalConfig",
    "LRDecayStyle",
    "WSDDecayStyle",
    "LR_DECAY_STYLES",
    "WSD_DECAY_STYLES",
    "FP8Format",
    "FP8Recipe",
    "FP8AmaxComputeAlgo",
    "FP8_FORMATS",
    "FP8_RECIPES",
]

RopeKind = Literal["1d", "mrope"]
MoEDispatcher = Literal["alltoall", "allgather"]
ImageAttention = Literal["bidirectional", "causal"]
DType = Literal["fp32", "bf16"]
# Vision-tower variants: Qwen2.5-VL uses RMSNorm + SwiGLU, Qwen2-VL LayerNorm + QuickGELU.
VisionNorm = Literal["rmsnorm", "layernorm"]
VisionMLP = Literal["swiglu", "gelu_quick", "gelu_tanh"]
# How a learned position table is resized for another patch grid: bicubic (SigLIP's and CLIP's
# interpolate_pos_encoding) or bilinear with antialiasing (SigLIP2's native aspect ratios).
PositionInterpolation = Literal["bicubic", "bilinear_antialias"]
# The vision tower's architecture (megavl/config/towers.py says what each one fixes):
# Qwen2.5-VL / Qwen2-VL (2D RoPE, windows, native resolution), SigLIP (learned absolute
# positions) and CLIP (learned positions, a class token, a LayerNorm before the layers);
# compression_first (DeepSeek-OCR's manner: a window-attention ViT on the patches, a 16x token
# compressor, then a global-attention ViT on the compressed tokens).
VisionKind = Literal["qwen2_5_vl", "qwen2_vl", "siglip", "clip", "compression_first"]
# The projector from vision features to the LM width: merge_mlp (Qwen's norm, 2x2 merge,
# 2-layer GELU MLP), pixel_shuffle (merge s x s patches, one linear; Idefics3 / SmolVLM /
# SiQ-VL), mlp (LLaVA's 2-layer GELU MLP on every patch).
AdapterKind = Literal["merge_mlp", "pixel_shuffle", "mlp"]
# Where the projector normalises: each patch before the merge, its output, or nowhere.
AdapterNorm = Literal["before", "after", "none"]
# How image tokens are numbered for the LM's RoPE: spatial (Qwen's multimodal ids: an image's
# tokens share a temporal position and spread over height and width; with rope 1d the LM takes
# the temporal row) or sequential (every token one more than the last, as LLaVA and Idefics3 do).
ImagePositions = Literal["spatial", "sequential"]
MropeLayout = Literal["sections", "interleaved"]
# How an image becomes vision tokens (see megavl/data/resolution.py).
ResolutionMode = Literal["native", "fixed", "tiling"]
FixedFit = Literal["pad", "resize"]
ImageBackendName = Literal["auto", "dali", "pillow"]
# Where a pack's images are decoded: in the data loader (its workers, or the training process
# with num_workers 0), always on the CPU; or in the training process after the loader and the
# vision-token balancing, on the training device (DALI's nvJPEG on a GPU). auto: the trainer
# when the back end is DALI and training runs on CUDA, else the loader.
DecodePlace = Literal["auto", "loader", "trainer"]
# megatron's learning-rate decay after warmup; WSD holds the peak, then anneals at the end.
LRDecayStyle = Literal["cosine", "linear", "constant", "WSD"]
WSDDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]
# A training stage whose preset settings become the config's defaults (megavl/config/stages.py).
Stage = Literal["align", "pretrain", "sft", "expand_embeddings"]
# Which tokens are targets: the assistant answers, or all text after the system
# prompt (image tokens never are), as alignment stages train.
LossScope = Literal["answers", "all_text"]
OptimizerName = Literal["adamw", "muon"]
LayerBackend = Literal["auto", "te", "local"]
# How Newton-Schulz treats a TP-sharded matrix: orthogonalise the whole matrix, gathered on
# every rank (duplicated) or computed jointly (distributed), or each shard on its own
# (blockwise: cheaper, but the update then depends on the TP size).
MuonTPMode = Literal["duplicated", "distributed", "blockwise"]
MuonScaleMode = Literal["spectral", "shape_scaling", "unit_rms_norm"]
# auto: a checkpoint.dir holding a complete checkpoint is resumed from when checkpoint.load is unset.
ResumeMode = Literal["auto", "never"]
# FP8 GEMMs through Transformer Engine (megatron's --fp8-format): e4m3 for every FP8 tensor, or
# hybrid (e4m3 forward, e5m2 for the gradients, whose range matters more than their precision).
FP8Format = Literal["e4m3", "hybrid"]
# How the FP8 scales are chosen: delayed (from a history of amaxes), tensorwise (each tensor's
# current amax), blockwise (1x128 / 128x128 blocks, Hopper and newer), mxfp8 (32-element blocks
# with power-of-two scales, Blackwell). megatron-core's fp8_recipe names.
FP8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
FP8AmaxComputeAlgo = Literal["max", "most_recent"]

Recompute = Literal["none", "full"]

# The same choices as tuples, for code that iterates over them.
ROPE_KINDS = get_args(RopeKind)
MOE_DISPATCHERS = get_args(MoEDispatcher)
IMAGE_ATTENTION_KINDS = get_args(ImageAttention)
DTYPES = get_args(DType)
VISION_NORMS = get_args(VisionNorm)
VISION_MLPS = get_args(VisionMLP)
POSITION_INTERPOLATIONS = get_args(PositionInterpolation)
VISION_KINDS = get_args(VisionKind)
ADAPTER_KINDS = get_args(AdapterKind)
ADAPTER_NORMS = get_args(AdapterNorm)
IMAGE_POSITIONS = get_args(ImagePositions)
RESOLUTION_MODES = get_args(ResolutionMode)
FIXED_FITS = get_args(FixedFit)
IMAGE_BACKENDS = get_args(ImageBackendName)
DECODE_PLACES = get_args(DecodePlace)
RESUME_MODES = get_args(ResumeMode)
LOSS_SCOPES = get_args(LossScope)
STAGES = get_args(Stage)
LR_DECAY_STYLES = get_args(LRDecayStyle)
WSD_DECAY_STYLES = get_args(WSDDecayStyle)
FP8_FORMATS = get_args(FP8Format)
FP8_RECIPES = get_args(FP8Recipe)


@dataclass
class WindowStageConfig:
    """compression_first's first stage: a window-attention ViT over the patches (SAM's role in
    DeepSeek-OCR), before the compressor. Its windows are model.vision.window_size pixels a side,
    its norm and MLP the tower's."""

    num_layers: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    ffn_hidden_size: int = 0
    # 0-based layers of this stage that attend over the whole image; the rest use windows.
    full_attention_layers: list[int] = field(default_factory=list)


@dataclass
class VisionConfig:
    kind: VisionKind = "qwen2_5_vl"
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    # Pixels per window side; a window holds window_size // patch_size
    # patches per side.
    window_size: int = 112
    # 0-based layers that attend over the whole image; the rest use windows.
    full_attention_layers: list[int] = field(default_factory=lambda: [3])
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Norm of the encoder layers and of the adapter's pre-merge norm
    # (layernorm has a bias).
    norm: VisionNorm = "rmsnorm"
    # swiglu: gated fc1 = [gate; up] with SiLU; gelu_quick: fc1 -> x*sigmoid(1.702x) -> fc2;
    # gelu_tanh: fc1 -> GELU (tanh approximation) -> fc2 (SigLIP).
    mlp: VisionMLP = "swiglu"
    # Kinds with learned positions (siglip, clip): the side in pixels of the images the position
    # table was trained for; it holds (image_size // patch_size)**2 positions (plus the class
    # token's) and is resized for other patch grids (position_interpolation). 0 for the Qwen kinds.
    image_size: int = 0
    position_interpolation: PositionInterpolation = "bicubic"
    # A LayerNorm after the last layer (SigLIP's post_layernorm, whose output Idefics3 and
    # SiQ-VL project); LLaVA's CLIP features come from before it.
    post_norm: bool = False
    # Pixel normalisation (x / 255 - mean) / std per channel, as the tower was pretrained.
    # null: the kind's own (OpenAI CLIP's statistics for qwen2_5_vl, qwen2_vl and clip; 0.5 for siglip).
    image_mean: Optional[list[float]] = None
    image_std: Optional[list[float]] = None
    # kind compression_first only: the window stage before the compressor, with windows of
    # window_size pixels. The compressor merges spatial_merge_size x spatial_merge_size patches
    # into one token of hidden_size (a convolution whose kernel equals its stride), and num_layers,
    # hidden_size, num_attention_heads and ffn_hidden_size size the global stage after it, whose
    # learned positions are image_size // (patch_size * spatial_merge_size) a side.
    window_stage: WindowStageConfig = field(default_factory=WindowStageConfig)


@dataclass
class AdapterConfig:
    # It merges model.vision.spatial_merge_size**2 neighbouring patches into one LM token
    # (merge_mlp, pixel_shuffle; 1 for mlp, which projects every patch).
    kind: AdapterKind = "merge_mlp"
    # The MLP's hidden width (merge_mlp, mlp). None: merge_mlp uses the merged width
    # vision.hidden_size * spatial_merge_size**2, mlp the LM width. pixel_shuffle has one linear.
    ffn_hidden_size: Optional[int] = None
    # None: the kind's own (merge_mlp: before, in the tower's norm kind; the others none).
    # Other norms are LayerNorms with a bias: before over each patch, after over the output.
    norm: Optional[AdapterNorm] = None
    # Biases on the projector's linears (Idefics3's pixel-shuffle linear has none).
    bias: bool = True


@dataclass
class MoEConfig:
    # 0 keeps the LM dense; otherwise the MLPs of every layer not in dense_layers
    # become mixture-of-experts layers with a router shared by text and vision tokens.
    num_experts: int = 0
    top_k: int = 2
    # Per-expert FFN width; None uses model.lm.ffn_hidden_size.
    ffn_hidden_size: Optional[int] = None
    # Width of an always-on shared expert; None for none.
    shared_expert_ffn_hidden_size: Optional[int] = None
    # 0-based LM layers that keep a dense MLP (e.g. [0] for a dense first layer).
    dense_layers: list[int] = field(default_factory=list)
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 1e-3
    dispatcher: MoEDispatcher = "alltoall"
    # True: the top-k probabilities are renormalised to sum to one (softmax over
    # the chosen logits); False: each chosen expert keeps its softmax probability
    # over all experts (megatron's moe_router_pre_softmax; Qwen3 norm_topk_prob=false).
    normalize_top_k: bool = True


@dataclass
class VisionLoRAConfig:
    # Low-rank adapters that only vision tokens use, on every (expert) MLP and on
    # the attention's QKV and output projections. A rank of 0 removes them.
    mlp_rank: int = 32
    attn_rank: int = 8
    # The update is (alpha / rank) * B @ A.
    alpha: float = 32.0
    # Their own weight decay, pulling the vision path back toward the text path.
    weight_decay: float = 0.1
    # False keeps the adapters in the model (and checkpoints) but unused and
    # frozen, e.g. for the alignment stage.
    enabled: bool = True


@dataclass
class LMConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    # The width of each attention head (megatron's kv_channels). None: hidden_size /
    # num_attention_heads. Qwen3 sets it apart (Qwen3-0.6B: 16 heads of 128 on a width of 1024).
    head_dim: Optional[int] = None
    ffn_hidden_size: int = 344
    vocab_size: int = 2048
    qkv_bias: bool = True
    qk_layernorm: bool = False
    rope: RopeKind = "mrope"
    # Rotary frequency pairs given to the temporal, height and width axes.
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])
    # How mrope hands the frequencies to the axes: sections (Qwen2-VL, Qwen2.5-VL: the first
    # mrope_section[0] frequencies temporal, then height, then width) or interleaved (Qwen3-VL:
    # t, h, w, t, h, w, ... while height and width last, temporal after).
    mrope_layout: MropeLayout = "sections"
    rope_theta: float = 1000000.0
    # Llama 3.x's frequency scaling ("llama3" in Hugging Face) by this factor (8 for Llama 3.1,
    # 32 for Llama 3.2), with megatron-core's fixed low / high frequency factors 1 and 4 and an
    # original context of 8192 tokens. None: unscaled. 1-D RoPE only.
    rope_scaling_factor: Optional[float] = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    image_attention: ImageAttention = "bidirectional"
    image_positions: ImagePositions = "spatial"
    image_token_id: int = 3
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision_lora: VisionLoRAConfig = field(default_factory=VisionLoRAConfig)


def lm_head_dim(lm: "LMConfig") -> int:
    """The LM's attention head width: model.lm.head_dim, or hidden_size / num_attention_heads."""
    return lm.head_dim if lm.head_dim is not None else lm.hidden_size // lm.num_attention_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # The megatron-core layer implementations: te (Transformer Engine's fused kernels), local
    # (megatron-core's own), or auto: te where it is installed and can build the model, else local.
    layer_backend: LayerBackend = "auto"


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    # Tensor parallelism inside each expert (megatron's expert_tensor_parallel_size).
    expert_tensor: int = 1
    context: int = 1
    sequence_parallel: bool = False
    # LM layers on the first pipeline stage. That stage also runs the vision
    # encoder, so giving it fewer LM layers balances the stages. None splits
    # the LM evenly.
    first_stage_lm_layers: Optional[int] = None
    distributed_optimizer: bool = True


@dataclass
class PerfConfig:
    """megatron's performance switches. null (the default) is auto: on where this machine and
    layout can run it (megavl/platform/perf.py decides and the dry run prints why), off on the CPU;
    true asks for it and stops the run before start-up when it cannot run, false turns it off."""

    # Gradient reduce (all-reduce / reduce-scatter) bucket by bucket during the backward.
    overlap_grad_reduce: Optional[bool] = None
    # The distributed optimizer's parameter all-gather bucket by bucket during the next forward.
    overlap_param_gather: Optional[bool] = None
    # Parameters per gradient bucket; null: megatron's max(40M, 1M x DP).
    bucket_size: Optional[int] = None
    # Fused kernels (CUDA only): the weight-gradient GEMM accumulating straight into the fp32
    # main gradient (TE linears, or apex's fused_weight_gradient_mlp_cuda for local ones), SwiGLU
    # fused with its bias, RoPE applied by TE's kernel (1-D RoPE only), the MoE token permutation
    # by TE's kernel, and the cross-entropy fused over the vocabulary shards (TE's where TE is
    # installed, else megatron's own), which never holds the logits in fp32 whole.
    gradient_accumulation_fusion: Optional[bool] = None
    bias_activation_fusion: Optional[bool] = None
    rope_fusion: Optional[bool] = None
    moe_permute_fusion: Optional[bool] = None
    cross_entropy_fusion: Optional[bool] = None
    # Activation recompute, per tower: full drops a layer's activations after its forward and
    # recomputes them in the backward (megavl/models/recompute.py); none keeps them.
    recompute_lm: Recompute = "none"
    # With recompute_lm = full: the first N LM layers of each pipeline stage (null: all of them).
    recompute_lm_layers: Optional[int] = None
    recompute_vision: Recompute = "none"


@dataclass
class ResolutionConfig:
    """How images are sized; the default for every dataset, and per dataset
    overridable from a metadataset's ``subflavors: {resolution: {...}}``."""

    # native: keep the aspect ratio, sides multiples of patch*merge, area in
    #   [min_pixels, max_pixels] (Qwen2-VL's rule).
    # fixed: one regime of fixed_tokens merged tokens (256 -> 448x448 px at patch 14 /
    #   merge 2; a count that is not square, the most nearly square landscape grid:
    #   96 -> 8 x 12 tokens, 224x336 px), reached by padding (aspect kept) or resizing.
    # tiling: a grid of tile_size tiles fitting the aspect ratio, up to
    #   max_tiles, plus an optional global thumbnail (documents).
    mode: ResolutionMode = "native"
    min_pixels: int = 3136
    max_pixels: int = 200704
    fixed_tokens: int = 256
    fixed_fit: FixedFit = "pad"
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 9
    thumbnail: bool = True
    # Text such as "<tile_1_2>" / "<tile_global>" before each tile's image tokens.
    tile_tags: bool = False


@dataclass
class MaxPixelScheduleConfig:
    """Progressive cap on native-resolution max_pixels: a step function that
    rises geometrically from start_max_pixels to data.resolution.max_pixels in
    `stages` equal steps over the first `fraction` of training."""

    start_max_pixels: int = 0  # 0: no schedule, the cap is max_pixels throughout
    fraction: float = 0.35
    stages: int = 4


@dataclass
class DataConfig:
    # A prepared dataset directory (energon .nv-meta) or a metadataset YAML
    # blending several of them.
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    tokenizer: Optional[str] = None
    # Dataloader worker processes per rank (decode runs in them); 0 decodes in
    # the training process.
    num_workers: int = 0
    image_backend: ImageBackendName = "auto"
    decode_images_in: DecodePlace = "auto"
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    max_pixels_schedule: MaxPixelScheduleConfig = field(default_factory=MaxPixelScheduleConfig)
    # Images larger than this are refused before decoding (decompression bombs).
    max_image_pixels: int = 64_000_000
    # Start every example with the tokenizer's BOS token (or data.bos_token), as models
    # pretrained with one expect; never a target.
    add_bos: bool = False
    bos_token: Optional[str] = None
    conversation_mask_prob: float = 0.5
    grounding_conversation_mask_prob: float = 0.7
    max_images_per_pack: int = 8
    # Vision-token budget per pack; 0: only the token budget (train.seq_length) applies.
    max_vision_tokens_per_pack: int = 0
    # Records the packer chooses from at a time (first-fit decreasing). They hold
    # only encoded bytes until packed: a larger buffer packs tighter for little memory.
    packing_buffer_size: int = 512
    shuffle_buffer_size: int = 100
    # Energon reads shards in random slices of at most this many samples.
    max_samples_per_sequence: int = 100
    # Even out vision tokens across data-parallel ranks within each step.
    balance_vision_tokens: bool = True
    # Stop the run when a dataset's share of failed samples exceeds this after
    # at least failure_check_min_samples of its samples were read.
    max_failure_rate: float = 0.05
    failure_check_min_samples: int = 200
    # True: every data-parallel rank reads the global stream and takes its share of
    # microbatches, so results do not depend on the DP size (each rank decodes all
    # samples). False: records are split across DP ranks (each decodes only its own).
    layout_invariant: bool = True


@dataclass
class PartConfig:
    """Whether a part of the model trains, and its learning-rate and weight-decay multipliers
    (of train.lr / train.min_lr and train.weight_decay)."""

    train: bool = True
    lr_mult: float = 1.0
    wd_mult: float = 1.0


@dataclass
class TrainablePartsConfig:
    """What trains. A frozen part gets no gradient buffer and no optimizer state; a vision
    tower frozen entirely runs without building its autograd graph."""

    # The vision encoder (patch embedding and layers).
    vision: PartConfig = field(default_factory=PartConfig)
    # With vision.train: only the last N encoder layers train (None: all of it); the
    # patch embedding and the earlier layers stay frozen.
    vision_last_layers: Optional[int] = None
    adapter: PartConfig = field(default_factory=PartConfig)
    # The LM's layers and final norm, except its router and vision adapters.
    lm: PartConfig = field(default_factory=PartConfig)
    lm_embeddings: PartConfig = field(default_factory=PartConfig)
    # Tied to lm_embeddings when model.lm.tie_embeddings (the two must then agree).
    output_layer: PartConfig = field(default_factory=PartConfig)
    # The vision-only LoRA adapters (also inactive and frozen with model.lm.vision_lora.enabled = false).
    vision_lora: PartConfig = field(default_factory=PartConfig)
    # The MoE routers.
    router: PartConfig = field(default_factory=PartConfig)


# The parts' names, in the order above.
TRAINABLE_PARTS = tuple(f.name for f in fields(TrainablePartsConfig) if f.default_factory is PartConfig)


@dataclass
class TaskEvalConfig:
    """Task accuracy during training (megavl/eval/): answers generated for the first
    ``samples`` records of data.val_path, scored and logged under task/."""

    # Steps between task evaluations; None: none during training.
    interval: Optional[int] = None
    # Also after the last step (the run's final table), when interval is set.
    at_end: bool = True
    samples: int = 48
    max_new_tokens: int = 48
    # Prompts per generation batch on each data-parallel rank.
    batch_size: int = 8


@dataclass
class MuonConfig:
    """megatron-core's Muon (train.optimizer: muon) for the 2-D weights of the language model,
    its router and the adapter; everything else (vision tower, embeddings, output layer, norms,
    biases, vision LoRA) keeps AdamW with the adam_* settings."""

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    # spectral scales the orthogonalised update by sqrt(max(rows, cols)); with
    # extra_scale_factor 0.2 its RMS matches AdamW's, so train.lr carries over (Moonlight).
    scale_mode: MuonScaleMode = "spectral"
    extra_scale_factor: float = 0.2
    tp_mode: MuonTPMode = "duplicated"
    # Orthogonalise a fused QKV weight's query, key and value blocks apart.
    split_qkv: bool = True
    # Multiplies the learning rate of the Muon groups (the parts' lr_mult still apply).
    lr_mult: float = 1.0


@dataclass
class TrainConfig:
    # None: no preset; otherwise the stage's settings are this config's defaults.
    stage: Optional[Stage] = None
    steps: int = 100
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 4
    seq_length: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 10
    # Warmup as a share of train.steps; when set it replaces warmup_steps (see warmup()).
    warmup_fraction: Optional[float] = None
    lr_decay_style: LRDecayStyle = "cosine"
    # WSD: the last wsd_decay_fraction of the steps anneal from lr to min_lr, shaped by wsd_decay_style.
    wsd_decay_fraction: float = 0.1
    wsd_decay_style: WSDDecayStyle = "linear"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # adamw everywhere, or muon for the LM's and adapter's matrices (train.muon) with AdamW beside it.
    optimizer: OptimizerName = "adamw"
    muon: MuonConfig = field(default_factory=MuonConfig)
    task_eval: TaskEvalConfig = field(default_factory=TaskEvalConfig)
    clip_grad: float = 1.0
    # answers: the assistant's answers (and their end-of-turn token); all_text: every token
    # after the system prompt except the images'. Either way normalised per optimizer step.
    loss_scope: LossScope = "answers"
    dtype: DType = "fp32"
    # FP8: the GEMMs of the LM's Transformer Engine linears (attention and MLP projections, experts)
    # run in FP8, everything else stays bf16 (so it needs dtype bf16); None: no FP8. The dry run
    # prints what runs in which precision (megavl/models/precision.py).
    fp8: Optional[FP8Format] = None
    fp8_recipe: FP8Recipe = "delayed"
    # Delayed scaling only: a tensor's scale comes from the largest (max) or the latest
    # (most_recent) of its last fp8_amax_history_len amaxes, with 2**fp8_margin head room.
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: FP8AmaxComputeAlgo = "max"
    fp8_margin: int = 0
    # The vision tower's linears in FP8 too. Off by default: the tower is a small share of the
    # FLOPs, and Qwen2.5-VL's MLP width (3420) is not a multiple of the FP8 GEMM granularity.
    fp8_vision: bool = False
    dropout: float = 0.0
    # Std of the normal initialisation (residual outputs are scaled by 1/sqrt(2 * layers)).
    init_std: float = 0.02
    eval_interval: int = 50
    eval_steps: int = 2
    # Seconds after start-up at which the run saves a checkpoint and exits as if
    # preempted (exit status 75), e.g. a little before a batch job's time limit;
    # leave room for one step and one save. None: no limit.
    max_wall_time: Optional[float] = None
    # Steps in a row whose loss or gradients may be NaN / inf (each is skipped, not
    # applied) before the run stops.
    max_nonfinite_steps: int = 10
    parts: TrainablePartsConfig = field(default_factory=TrainablePartsConfig)
    # Only the rows of token ids >= this in the LM's input embedding and output layer train
    # (new tokens, e.g. added by tools/expand_vocab.py); the rows below stay bit-identical.
    # None: every row trains.
    embedding_rows_from: Optional[int] = None

    def warmup(self) -> int:
        """Warmup steps: warmup_fraction of the steps when set, else warmup_steps."""
        if self.warmup_fraction is not None:
            return round(self.warmup_fraction * self.steps)
        return self.warmup_steps

    def wsd_decay_steps(self) -> int:
        return max(1, round(self.wsd_decay_fraction * self.steps))


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    # Weights to start from (e.g. tools/convert_from_hf.py output) when not resuming;
    # vision adapters missing from it start fresh (B = 0, so the model is unchanged).
    pretrained: Optional[str] = None
    # 0 saves only at the end of training.
    interval: int = 0
    # A checkpoint to resume from (a root with `latest`, or one iter_* folder).
    load: Optional[str] = None
    # With load unset: auto resumes from the newest complete checkpoint in dir, if any.
    resume: ResumeMode = "auto"
    # Keep only the newest keep_last checkpoints in dir (0: keep all), and also
    # every one whose step is a multiple of keep_every (0: none).
    keep_last: int = 0
    keep_every: int = 0
    # Interval saves are written by a background process while training goes on
    # (megatron's asynchronous save); the step only waits for the tensors to be
    # staged. The final save (end of run, preemption) is always written in full.
    async_save: bool = False


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    interval: int = 1
    # Peak TFLOP/s of one GPU that the logged MFU divides by; None: the dense bf16 peak of a
    # GPU megavl/planning/hardware.py knows (H100, H200, B200 SXM) in a bf16 run, else no MFU.
    peak_tflops: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
