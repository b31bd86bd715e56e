"""The tiling policy of every kernel, in one place: tile shapes, default and candidate configurations, the
block-size rule, and the limits a configuration must fit.

Kernels and launchers take a configuration object; which one a layer runs is decided here (the default rule)
or measured among the candidates listed here (:mod:`.dispatch` keeps the winner).

* conv (:mod:`.conv`: ``sparse_conv2d``, ``spiking_conv2d``, ``sparse_conv_transpose2d``): :class:`ConvConfig`,
  :func:`default_config` / :func:`conv_config`, the measured candidates :func:`spiking_configs` (image tiles) and
  :func:`token_spiking_configs` (Conv1d tokens), :func:`conv_groups_fit`, the block-size rule
  :func:`select_block_size` (by input height) and :data:`AUTO_CANDIDATES`;
* grouped / depthwise (:mod:`.depthwise`): :class:`DepthwiseConfig`, :func:`default_depthwise_config`,
  :func:`occupancy_group`, :data:`TENSOR_CORE_MIN_CG`, :func:`grouped_block_size`;
* linear (:mod:`.linear`): :class:`LinearConfig`, :func:`default_linear_config` / :func:`linear_config`,
  :func:`wide_linear_config`, :func:`linear_blocks_fit`;
* batchnorm (:mod:`.batchnorm`): :func:`batchnorm_tile`; neuron (:mod:`.neuron`): :func:`neuron_tile`; neuron +
  max pool (:mod:`.neuron_pool`): :func:`neuron_pool_order`, :func:`neuron_pool_bits_tile`,
  :func:`neuron_pool_tile`; channel_dot (:mod:`.attention`): :func:`channel_dot_tile`;
  qk_token_attention (:mod:`.attention`): :func:`qk_token_tile`.
"""

from __future__ import annotations

from ._utils import cdiv, next_pow2, next_power_of_2

MAX_GROUPS = 256  # channel groups a conv program can list in registers
MAX_K_BLOCKS = 256  # K blocks a GEMM program can list in registers
#: input channels per group from which the tensor-core kernel (one launch per group) replaces the direct one
TENSOR_CORE_MIN_CG = 16
#: the default rule's smallest input height with a sparse block size (smaller maps run the dense op)
SPARSE_MIN_HEIGHT = 14
#: output tile edge of the direct (depthwise) kernel at most: larger tiles hold a non-zero somewhere far more
#: often, and the direct kernel gains only from tiles it can skip whole
DEPTHWISE_MAX_TILE = 8
#: what ``block_size="auto"`` measures: 8x8 and 16x16 skip tiles, and the layer's dense route
AUTO_CANDIDATES = (8, 16, "dense")


class _Config:
    """Shared behaviour of the configuration objects: ``key()`` (the fields in ``_KEY`` order, what the
    ``torch.ops.sparseflow`` schemas carry), ``as_dict()`` and ``repr``."""

    __slots__ = ()
    _KEY: tuple = ()

    def _check_pow2(self, minimum: int, *names: str, what: str = "") -> None:
        for name in names:
            v = getattr(self, name)
            if v < minimum or v & (v - 1):
                raise ValueError(f"{type(self).__name__}: {name} must be a power of two{what}, got {v}")

    def key(self):
        return tuple(getattr(self, k) for k in self._KEY)

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self):
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


class ConvConfig(_Config):
    """Tile shape and launch parameters of one conv kernel instance. ``tma``: load the tiles through tensor
    descriptors (Hopper's tensor-memory accelerator; dense, stride 1, channels_last fp16/bf16 inputs only).
    ``split_k``: with ``t_in_m``, that many programs share a tile's reduction (channel groups x taps), each writing
    its fp32 partial sum; the last to finish adds the partials in split order and runs the epilogue (dense, no
    occupancy written). ``tile_n``: with ``t_in_m``, the tile holds the same pixels of that many samples (the
    GEMM's rows are step x sample x pixel): on a map whose sides no power of two divides (14 x 14, 7 x 7) a tile of
    ``4 x 8`` pixels computes 256 rows for 196 (a quarter of its products thrown away), one of ``2 x 2`` pixels
    of 8 samples computes none in vain (dense, no occupancy written). ``stream_k``: with ``t_in_m``, that many
    programs per multiprocessor of the GPU (0: off) share the reduction iterations of all tiles equally, a program's
    share running from the tail of one tile into the head of the next; a tile's parts are combined as split-K's
    (dense, no occupancy written, not with ``split_k``): where the tiles are fewer than the multiprocessors (the
    deep layers at small batches) or leave the last wave part full, every multiprocessor gets the same work.
    ``im2col``: the reduction runs over the flattened (tap, channel) index in blocks of ``block_k`` instead of one tap
    and ``block_k`` channels at a time (the weight packed ``[1, K_PAD, CO_PAD]``, :func:`~.conv.pack_conv_weight`):
    for inputs of few channels (a DVS network's 2 polarities, an image's 3) whose channel blocks would be mostly
    padding, 3 x 3 taps of 2 channels are one K block of 32 instead of 9 of 16 (steps looped, pointer loads, dense)."""

    __slots__ = ("block_k", "block_n", "im2col", "num_stages", "num_warps", "split_k", "stream_k", "t_in_m", "tile_h",
                 "tile_n", "tile_w", "tma")
    _KEY = ("tile_h", "tile_w", "block_n", "block_k", "t_in_m", "num_warps", "num_stages", "tma", "split_k", "tile_n",
            "stream_k", "im2col")

    def __init__(self, tile_h=8, tile_w=8, block_n=64, block_k=16, t_in_m=False, num_warps=4, num_stages=3,
                 tma=False, split_k=1, tile_n=1, stream_k=0, im2col=False):
        self.tile_h, self.tile_w = int(tile_h), int(tile_w)
        self.block_n, self.block_k = int(block_n), int(block_k)
        self.t_in_m, self.tma = bool(t_in_m), bool(tma)
        self.num_warps, self.num_stages = int(num_warps), int(num_stages)
        self.split_k, self.tile_n, self.stream_k = int(split_k), int(tile_n), int(stream_k)
        self.im2col = bool(im2col)
        if self.im2col and (self.t_in_m or self.tma):
            raise ValueError("ConvConfig: im2col runs steps-looped tiles with pointer loads (not t_in_m, not tma)")
        if self.stream_k < 0 or (self.stream_k and (not self.t_in_m or self.split_k > 1)):
            raise ValueError(f"ConvConfig: stream_k (programs per multiprocessor) must be 0, or more with t_in_m and "
                             f"without split_k, got stream_k={self.stream_k}, t_in_m={self.t_in_m}, "
                             f"split_k={self.split_k}")
        self._check_pow2(1, "tile_h", "tile_w", "block_n", "block_k", "tile_n")
        if self.tile_n > 1 and not self.t_in_m:
            raise ValueError(f"ConvConfig: tile_n > 1 (samples per tile) needs t_in_m, got tile_n={self.tile_n}")
        if self.block_k < 16 or self.block_n < 16:
            raise ValueError("ConvConfig: block_k and block_n must be at least 16 (tensor-core tiles)")
        if self.split_k < 1 or (self.split_k > 1 and not self.t_in_m):
            raise ValueError(f"ConvConfig: split_k must be 1, or more with t_in_m (the whole sum of every step in "
                             f"one tile), got split_k={self.split_k}, t_in_m={self.t_in_m}")


class DepthwiseConfig(_Config):
    """Tile of one program of the direct kernel: ``tile_h x tile_w`` output pixels, ``block_c`` channels."""

    __slots__ = ("block_c", "num_warps", "tile_h", "tile_w")
    _KEY = ("tile_h", "tile_w", "block_c", "num_warps")

    def __init__(self, tile_h=8, tile_w=8, block_c=32, num_warps=4):
        self.tile_h, self.tile_w, self.block_c, self.num_warps = int(tile_h), int(tile_w), int(block_c), int(num_warps)
        self._check_pow2(1, "tile_h", "tile_w", "block_c")


class LinearConfig(_Config):
    """Tile shape and launch parameters of one GEMM instance."""

    __slots__ = ("block_k", "block_m", "block_n", "num_stages", "num_warps")
    _KEY = ("block_m", "block_n", "block_k", "num_warps", "num_stages")

    def __init__(self, block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3):
        self.block_m, self.block_n, self.block_k = int(block_m), int(block_n), int(block_k)
        self.num_warps, self.num_stages = int(num_warps), int(num_stages)
        self._check_pow2(16, "block_m", "block_n", "block_k", what=" >= 16 (tensor-core tiles)")


# ------------------------------------------------------------------------------------------------ conv
def select_block_size(height: int) -> int | str:
    """Default rule: H >= 56 -> 16, 14 <= H < 56 -> 8, smaller -> ``"dense"`` (too few blocks to skip)."""
    if height >= 56:
        return 16
    if height >= SPARSE_MIN_HEIGHT:
        return 8
    return "dense"


def default_config(C: int, CO: int, block_size=None, t_in_m: bool = False) -> ConvConfig:
    """Tile and block sizes from the layer shape (``block_size`` = spatial tile edge, default 8)."""
    if block_size is None:
        block_size = 8
    th, tw = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    block_n = min(64, max(16, next_pow2(CO)))
    block_k = 16
    while cdiv(C, block_k) > MAX_GROUPS:
        block_k *= 2
    rows = th * tw
    num_warps = 8 if rows * block_n >= 128 * 64 else 4
    return ConvConfig(tile_h=th, tile_w=tw, block_n=block_n, block_k=block_k, t_in_m=t_in_m,
                      num_warps=num_warps, num_stages=3)


def conv_config(C: int, CO: int, block_size) -> ConvConfig:
    """The sparse conv configuration of a layer whose ``block_size`` is an int (its tile edge) or a word
    (``"dense"``, ``"auto"``: the 8 x 8 default)."""
    return default_config(C, CO, block_size if isinstance(block_size, int) else 8)


def conv_groups_fit(C: int, cfg: ConvConfig) -> bool:
    """Whether ``C`` input channels make at most :data:`MAX_GROUPS` groups of ``cfg.block_k`` (sparse skipping)."""
    return cdiv(C, cfg.block_k) <= MAX_GROUPS


def require_conv_groups_fit(op: str, C: int, cfg: ConvConfig, per_group: bool = False) -> None:
    """Refuse ``C`` input channels (of each group, with ``per_group``) that make more than :data:`MAX_GROUPS` groups
    of ``cfg.block_k``: a convolution kernel's channel-group codes would not fit."""
    if not conv_groups_fit(C, cfg):
        what = "channels per group" if per_group else "channels"
        raise ValueError(f"{op}: {C} {what} make more than {MAX_GROUPS} groups of {cfg.block_k}")


def spiking_configs(C: int, CO: int, T: int, tma: bool = False, N: int | None = None) -> dict[str, ConvConfig]:
    """The dense fused-kernel configurations a spiking layer measures (the best of the H100 sweeps:
    8x8 output tiles with T looped inside, and 4x4 tiles with T in the GEMM's M for deep layers). With ``tma``
    (the layer's input qualifies, :func:`~sparseflow_kernels.conv.tma_supported`) also the tensor-descriptor
    configurations (``tma_*``, :data:`TMA_CONFIGS`), K blocks of up to 64 channels; with ``N`` (the batch) not those
    whose tiles hold more samples than there are."""
    bk = 32 if C >= 32 else 16
    cfgs = {"fused_dense": ConvConfig(8, 8, 64, bk, False, 4, 3)}
    if T <= 8:
        cfgs["fused_tm"] = ConvConfig(4, 4, 64, bk, True, 4, 3)
        if CO >= 128:
            cfgs["fused_tm_n128"] = ConvConfig(4, 4, 128, bk, True, 4, 3)
    if C < 16:  # channel blocks mostly padding: the (tap, channel) reduction in blocks of 32
        for name, (_th, _tw, bn, _warps) in IM2COL_CONFIGS.items():
            if bn <= max(64, next_pow2(CO)):
                cfgs[name] = _im2col_config(name)
    if tma:
        tbk = min(64, max(16, next_pow2(C)))
        for name, (th, tw, bn, t_in_m, warps, split, *more) in TMA_CONFIGS.items():
            tn = more[0] if more else 1
            sk = more[1] if len(more) > 1 else 0
            if (t_in_m and T > 8) or bn > max(64, next_pow2(CO)) or (N is not None and tn > N):
                continue
            cfgs[name] = ConvConfig(th, tw, bn, tbk, t_in_m, warps, 3, tma=True, split_k=split, tile_n=tn, stream_k=sk)
    return cfgs


def im2col_conv_config(CO: int) -> ConvConfig:
    """The im2col configuration of a convolution without a neuron (an image stem's conv -> BatchNorm, measured
    against cuDNN): ``im2col_8x8``, or ``im2col_8x8_n128`` (128 output channels on two warp groups) for wider
    layers."""
    return _im2col_config("im2col_8x8" if CO <= 64 else "im2col_8x8_n128")


def _im2col_config(name: str) -> ConvConfig:
    th, tw, bn, warps = IM2COL_CONFIGS[name]
    return ConvConfig(th, tw, bn, 32, False, warps, 3, im2col=True)


#: the im2col configurations of :func:`spiking_configs` (layers of fewer than 16 input channels): ``{name: (tile_h,
#: tile_w, block_n, num_warps)}``, steps looped, K blocks of 32 (tap, channel) pairs
IM2COL_CONFIGS = {
    "im2col_8x8": (8, 8, 64, 4),
    "im2col_8x8_n128": (8, 8, 128, 8),
    "im2col_8x16": (8, 16, 64, 8),
}


#: the tensor-descriptor configurations of :func:`spiking_configs`: ``{name: (tile_h, tile_w, block_n, t_in_m,
#: num_warps, split_k[, tile_n[, stream_k]])}``; ``row`` tiles are ``tile_w`` pixels in row-major order across the map's
#: rows (``tile_h`` 1), the ``tm`` ones hold every time step of the tile in the GEMM's M (T <= 8); the ``split`` ones
#: share each tile's reduction among that many programs (the deep layers at small batches, where the tiles are too few
#: for the GPU's multiprocessors). The 128-row tiles (``tma_8x16``, ``tma_tm_4x8_n128*``) load fewer bytes per
#: multiply-add than the smaller ones: each K step of an ``M x N`` tile loads ``(M + N) x BLOCK_K`` operands for ``M x N
#: x BLOCK_K`` multiply-adds, 26 multiply-adds per operand at 32 x 128, 43 at 128 x 64, 64 at 128 x 128; they take two
#: warp groups, which hold the accumulator and (steps looped) the membrane in registers without spilling (``tma_8x16``
#: on one warp group uses all 255 registers a thread has). The ``nb`` ones hold the same pixels of ``tile_n`` samples
#: (:class:`ConvConfig`): 128 rows that the map's sides divide, on 28 x 28 (``4x4_nb2``) and 14 x 14 (``2x2_nb8``),
#: where power-of-two tiles of one sample compute 12-23 % of their rows beyond the map; on 7 x 7, rows of 8 pixels run
#: across the map's rows (``row8``: 56 rows for 49). Stream-K (``ConvConfig.stream_k``) is not among them: with tensor
#: descriptors it gave other bits on repeated calls on the H200, and :func:`~sparseflow_kernels.conv.launch_conv`
#: refuses that combination
TMA_CONFIGS = {
    "tma_row64_n128": (1, 64, 128, False, 8, 1),
    "tma_8x8": (8, 8, 64, False, 4, 1),
    "tma_8x16": (8, 16, 64, False, 8, 1),
    "tma_tm_4x8": (4, 8, 64, True, 4, 1),
    "tma_tm_4x8_n128": (4, 8, 128, True, 8, 1),
    "tma_tm_4x8_n128_split2": (4, 8, 128, True, 8, 2),
    "tma_tm_4x8_split2": (4, 8, 64, True, 4, 2),
    "tma_tm_2x4": (2, 4, 64, True, 4, 1),
    "tma_tm_2x4_n128": (2, 4, 128, True, 4, 1),
    "tma_tm_2x4_n128_split4": (2, 4, 128, True, 4, 4),
    "tma_tm_4x4_nb2": (4, 4, 64, True, 4, 1, 2),
    "tma_tm_4x4_nb2_n128": (4, 4, 128, True, 8, 1, 2),
    "tma_tm_2x2_nb8": (2, 2, 64, True, 4, 1, 8),
    "tma_tm_2x2_nb8_n128": (2, 2, 128, True, 8, 1, 8),
    "tma_tm_row8_nb4": (1, 8, 64, True, 8, 1, 4),
    "tma_tm_row8_nb4_split2": (1, 8, 64, True, 8, 2, 4),
}


def token_spiking_configs(C: int, CO: int, T: int) -> dict[str, ConvConfig]:
    """Token tiles of the fused kernel over ``[.., C, 1, L]`` (a spiking Conv1d): 64 or 128 tokens with T looped
    inside, or 32 tokens x T in the GEMM's M."""
    bk = 64 if C >= 64 else (32 if C >= 32 else 16)
    cfgs = {"fused_dense": ConvConfig(1, 64, 64, bk, False, 4, 3),
            "fused_m128": ConvConfig(1, 128, 64, bk, False, 8, 3)}
    if T <= 8:
        cfgs["fused_tm"] = ConvConfig(1, 32, 64, bk, True, 4, 3)
        if CO >= 128:
            cfgs["fused_tm_n128"] = ConvConfig(1, 32, 128, bk, True, 8, 3)
    return cfgs


# -------------------------------------------------------------------------------------- grouped / depthwise
def grouped_block_size(block_size, cg: int):
    """The block size of a grouped conv with ``cg`` input channels per group: capped at
    :data:`DEPTHWISE_MAX_TILE` for the direct kernel (``cg < TENSOR_CORE_MIN_CG``)."""
    if isinstance(block_size, int) and cg < TENSOR_CORE_MIN_CG:
        return min(block_size, DEPTHWISE_MAX_TILE)
    return block_size


def default_depthwise_config(CO: int, block_size=None, channels_last: bool = True) -> DepthwiseConfig:
    """``block_size`` x ``block_size`` output tiles (default 8) of up to 32 channels for channels_last inputs
    (loads contiguous along channels); NCHW inputs are read along rows, so their tiles are 4 x 32 pixels of up
    to 8 channels (64-byte row segments per channel) unless ``block_size`` is given."""
    if not channels_last and block_size is None:
        return DepthwiseConfig(4, 32, min(8, max(4, next_pow2(CO))), 4)
    th, tw = (8, 8) if block_size is None else ((block_size, block_size) if isinstance(block_size, int)
                                                   else tuple(block_size))
    block_c = min(32, max(4, next_pow2(CO)))
    return DepthwiseConfig(th, tw, block_c, 4)


def occupancy_group(cfg: DepthwiseConfig, cg: int, cog: int, element_size: int = 2) -> int:
    """Input channels one occupancy code covers: a power of two, at most the channels a block of ``block_c``
    outputs reads and at most one 32-byte memory sector of a channels_last pixel (16 fp16 / 8 fp32 channels),
    the finest granularity at which masking a load saves memory traffic."""
    span = max(1, (cfg.block_c * cg) // max(1, cog))
    g = 1
    while g * 2 <= min(span, max(1, 32 // element_size)):
        g *= 2
    return g


# ---------------------------------------------------------------------------------------------- linear
def default_linear_config(K: int, N: int, block_m: int | None = None) -> LinearConfig:
    block_n = min(128, max(16, next_pow2(N)))
    block_k = 32 if K >= 32 else 16
    while cdiv(K, block_k) > MAX_K_BLOCKS:
        block_k *= 2
    bm = block_m or 64
    num_warps = 8 if bm * block_n >= 128 * 128 else 4
    return LinearConfig(bm, block_n, block_k, num_warps, 3)


def linear_config(K: int, N: int, block_size=None, config: LinearConfig | None = None) -> LinearConfig:
    """A sparse linear layer's configuration: ``config`` when given, else the default with ``block_size`` rows
    per tile (an int >= 16; anything else: 64)."""
    if config is not None:
        return config
    bm = block_size if isinstance(block_size, int) and block_size >= 16 else None
    return default_linear_config(K, N, bm)


def linear_blocks_fit(K: int, cfg: LinearConfig) -> bool:
    """Whether ``K`` input features make at most :data:`MAX_K_BLOCKS` blocks of ``cfg.block_k`` (sparse skipping)."""
    return -(-K // cfg.block_k) <= MAX_K_BLOCKS


def wide_linear_config(cfg: LinearConfig) -> LinearConfig:
    """The 128 x 128 tile candidate (``"sparse_m128"``) with ``cfg``'s K block."""
    return LinearConfig(128, 128, cfg.block_k, 8, 3)


# ------------------------------------------------------------------------------------------- batchnorm
def batchnorm_tile(C: int, W: int, channels_innermost: bool) -> tuple[int, int, int]:
    """(TILE_H, TILE_W, BLOCK_C) of the BatchNorm kernel without an occupancy: 8x8 x 64 channels for
    channels_last (channels are contiguous), a row-major strip of about 64 pixels x 16 channels otherwise."""
    if channels_innermost and C > 1:
        return 8, 8, min(64, max(16, next_pow2(C)))
    tw = min(64, next_pow2(W))
    return max(1, 64 // tw), tw, 16


# ---------------------------------------------------------------------------------------------- neuron
def neuron_tile(C: int, S: int, T: int = 1) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_C, T_CHUNK) of the multi-step neuron kernel over ``[T, N, C, S]``: up to 64 channels, 1024
    elements per step, and ``T_CHUNK`` steps loaded at once: 8 or 4 where that divides ``T``, else 1 (no step is
    masked; the steps of a chunk sit in one thread's registers). Not 2: Triton 3.6 fails to compile a chunk of two
    steps whose input and residual come in different memory orders (its layout pass, on sm_90)."""
    block_c = min(64, next_power_of_2(C))
    t_chunk = 8 if T % 8 == 0 else 4 if T % 4 == 0 else 1
    return max(1, min(1024 // block_c, next_power_of_2(S))), block_c, t_chunk


def neuron_pool_tile(C: int, P: int, KK: int, N: int, multiprocessors: int = 1) -> tuple[int, int, int, bool]:
    """(BLOCK_P, BLOCK_C, num_warps, PREFETCH) of the neuron + max pool kernel over ``P`` output pixels of ``C``
    channels, ``KK`` window positions each, for ``N`` samples: up to 64 channels and 4096 lanes (pixels x window x
    channels) a program. Where that leaves fewer programs than the GPU has ``multiprocessors`` (the DVS network's 16
    and 8 px layers gave 64 and 16 programs to 132 multiprocessors, each walking its 16 steps one dependent load at
    a time), the tile halves, pixels first, until there are four programs a multiprocessor or it is down to 256
    lanes, and each program loads the next step while it computes this one (``PREFETCH``). Measured by the dispatch
    on the H200 (T=16, N=8, 128 channels, pool 2 / 2): 40 -> 31 us at 16 px and 29 -> 17.5 us at 8 px; at 32 px,
    whose 256 programs fill the device, halving to 1024 lanes took 218 us against 96, so such a tile is kept."""
    block_c = min(64, next_power_of_2(C))
    block_p = max(1, min(4096 // (KK * block_c), next_power_of_2(P)))

    def count(bp, bc):
        return cdiv(P, bp) * cdiv(C, bc) * N

    small = count(block_p, block_c) < multiprocessors
    while small and count(block_p, block_c) < 4 * multiprocessors and block_p * KK * block_c > 256:
        if block_p > 1:
            block_p //= 2
        elif block_c > 16:
            block_c //= 2
        else:
            break
    return block_p, block_c, 4 if block_p * KK * block_c >= 512 else 2, small


#: the most steps the neuron + max pool's ``"bits"`` order holds (one bit each in an int32 per lane)
BITS_MAX_STEPS = 32


def neuron_pool_order(T: int, kernel: tuple[int, int], stride: tuple[int, int], static: bool) -> str:
    """Which neuron + max pool kernels run (:func:`~sparseflow_kernels.neuron_pool.multistep_neuron_pool`):
    ``"bits"`` where the windows overlap or the input is one frame repeated over the steps, up to 32 steps (a
    ResNet stem's 3 / 2 / 1 pool); ``"steps"``, every position of a tile at once, otherwise (the DVS networks' 2 / 2
    pools over 16 steps). Measured on the H100 (``neuron_pool.json``; T=4, 64 channels at 112 x 112, a static frame,
    3 / 2 / 1, N=8): bits 33 us, steps 290 us (each pixel's neuron run in each of its windows, 2.25 times the LIF's
    division), the neuron kernel then the pool kernel 59 us; T=16, 128 channels, 2 / 2, N=8: steps 360 / 94 / 40 /
    12 / 7.5 us at 128 / 64 / 32 / 16 / 8 px, bits 379 / 100 / 28 / 14 / 13 us."""
    overlap = stride[0] < kernel[0] or stride[1] < kernel[1]
    return "bits" if (overlap or static) and T <= BITS_MAX_STEPS else "steps"


def neuron_pool_bits_tile(C: int, P: int, N: int, multiprocessors: int = 1) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of the max pool of the bits (``_pool_bits_kernel``) over ``P`` output pixels of
    ``C`` channels for ``N`` samples: up to 64 channels and 1024 lanes a program (8 a thread over 4 warps), halved,
    pixels first, down to 256 lanes while that leaves fewer than four programs a multiprocessor."""
    block_c = min(64, next_power_of_2(C))
    block_p = max(1, min(1024 // block_c, next_power_of_2(P)))
    while (cdiv(P, block_p) * cdiv(C, block_c) * N < 4 * multiprocessors and block_p * block_c > 256
           and block_p > 1):
        block_p //= 2
    return block_p, block_c, max(1, min(4, block_p * block_c // 256))


# ------------------------------------------------------------------------------------------ channel_dot
def channel_dot_tile(C: int, L: int, channels_innermost: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_L) of ``channel_dot``, measured on the H100 ([32, 384, 196] fp16): the whole token row in
    one load (up to 256), 32 channels when channels are innermost (the fused convolutions' spikes: 3.9 us against
    5.6 us for 64 x 128 tiles), 16 when tokens are (5.1 us against 15.3 us)."""
    return min(32 if channels_innermost else 16, max(16, next_pow2(C))), min(256, max(16, next_pow2(L)))


# ------------------------------------------------------------------------------------------ qk attention
def qk_token_tile(D: int, L: int) -> tuple[int, int]:
    """(D_P2, BLOCK_L) of ``qk_token_attention``: a head's ``D`` channels (a power of two at least) by up to 2048
    elements' worth of tokens (16 at least)."""
    d_p2 = next_power_of_2(max(1, D))
    return d_p2, max(16, min(next_power_of_2(max(1, L)), 2048 // d_p2))
