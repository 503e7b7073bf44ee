//! Dispatch plans: how one input is cut into chunks that fit a storage
//! binding, and into statistics tiles.

use crate::config::ChannelView;
use crate::error::{Error, Result};
use crate::kernels::{NORMALIZE_PER_THREAD, NORMALIZE_ROWS_PER_THREAD, WORKGROUP, finalize_groups, grid};
use crate::tensor::{DType, padded_bytes};

/// Statistics invocations to aim for: enough to fill a GPU's cores (or
/// lavapipe's SIMD lanes many times over), few enough that each streams a
/// long run and the partials stay small.
const STATS_INVOCATIONS: usize = 16384;
/// The shortest tile worth an invocation of its own.
const STATS_MIN_PER_THREAD: usize = 16;
/// Hard cap on any per-invocation loop (llvmpipe stops loops at 65535).
const MAX_LOOP: usize = 4096;
/// The longest statistics tile when a channel is very long: still under
/// llvmpipe's loop cap, so that any channel fits `MAX_TILES` tiles.
const MAX_LOOP_LONG: usize = 32768;
/// Each of the finalize kernels' eight lanes per channel loops over an
/// eighth of the channel's tiles (kept under 65535 steps).
const MAX_TILES: usize = 8 * 65000;

/// What a plan needs of the device: the bytes one chunk's storage binding
/// may cover (the device's limit or a cap below it), the device's own
/// binding limit (the partial sums are bound whole), the alignment of a
/// binding's offset, and the most workgroups a grid may have in one
/// dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlanLimits {
    pub max_binding: u64,
    pub device_binding: u64,
    pub alignment: u64,
    pub max_groups: u32,
}

/// A flat range of elements bound at one aligned offset. Any range works:
/// the kernels find each channel's values inside it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Chunk {
    /// Absolute index of the first element.
    pub start: usize,
    pub elems: usize,
    /// Byte offset of the binding (a multiple of the storage alignment).
    pub bind_offset: u64,
    /// Bytes bound.
    pub bind_size: u64,
    /// Elements between the binding's start and the chunk's first element.
    pub base: u32,
    /// Statistics tiles per channel, and where they start in its partials.
    pub tiles: usize,
    pub tile_offset: usize,
    /// Checked grids of the statistics / backward-reduce and the
    /// elementwise kernels over this chunk.
    pub stats_grid: (u32, u32),
    pub normalize_grid: (u32, u32),
}

/// How the kernels walk an input: one scalar at a time anywhere, or four
/// values at a time (a vec4 of float32, a vec2<u32> of float16) when the
/// layout lets four neighbours share a channel (`Inner4`:
/// inner % 4 == 0, e.g. NCHW) or be four consecutive channels (`Channels4`:
/// inner == 1 and channels % 4 == 0, e.g. NHWC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Layout {
    Generic,
    Inner4,
    /// Inner4 with inner % 16 == 0 (the elementwise kernels need no
    /// channel tracking); statistics treat it as Inner4.
    Inner16,
    Channels4,
    /// Channels4 with channels % 8 == 0: an invocation takes two
    /// neighbouring quads, so a SIMD group of eight reads 256 contiguous
    /// bytes of a row per step (10-30% faster on lavapipe than one quad,
    /// see benches/NOTES.md).
    Channels8,
    /// inner >= 16 but not a multiple of 4 (7x7 feature maps), length %
    /// 4 == 0: vec4s over the flat tensor. An elementwise invocation's
    /// sixteen values meet at most two channels, whose parameters it loads
    /// once and selects per lane; statistics read each run in the vec4s
    /// that cover it and mask the lanes outside (tiles sized in values, as
    /// Generic).
    Runs16,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DispatchPlan {
    pub view: ChannelView,
    pub dtype: DType,
    pub chunks: Vec<Chunk>,
    /// Layout of the elementwise kernels (normalise, dx).
    pub elementwise: Layout,
    /// Layout of the statistics kernels (masks take the generic one).
    pub stats: Layout,
    /// Statistics work per invocation: scalars (generic), vec4s (inner4) or
    /// rows (channels4).
    pub elems_per_thread: usize,
    pub total_tiles: usize,
    /// Checked grid of the finalize kernels (eight lanes per channel).
    pub finalize_grid: (u32, u32),
}

/// Mirror of `first_j_at` in `shaders/statistics.wgsl`: the first position
/// j = o * inner + i of channel `c` whose element index is >= `a`.
fn first_j_at(view: ChannelView, a: usize, c: usize) -> usize {
    let run = a / view.inner;
    let (o, ca) = (run / view.channels, run % view.channels);
    match c.cmp(&ca) {
        std::cmp::Ordering::Equal => o * view.inner + a % view.inner,
        std::cmp::Ordering::Greater => o * view.inner,
        std::cmp::Ordering::Less => (o + 1) * view.inner,
    }
}

/// The most values any channel has in elements [start, end). The count
/// depends only on where c lies relative to the channels at both ends, so
/// a few representatives cover every channel.
fn longest_channel_run(view: ChannelView, start: usize, end: usize) -> usize {
    let ca = (start / view.inner) % view.channels;
    let cb = (end / view.inner) % view.channels;
    let last = view.channels - 1;
    [
        0,
        ca.saturating_sub(1),
        ca,
        ca + 1,
        cb.saturating_sub(1),
        cb,
        cb + 1,
        last,
    ]
    .into_iter()
    .filter(|&c| c <= last)
    .map(|c| first_j_at(view, end, c) - first_j_at(view, start, c))
    .max()
    .unwrap_or(0)
}

impl Layout {
    pub(crate) const ALL: [Layout; 6] = [
        Layout::Generic,
        Layout::Inner4,
        Layout::Inner16,
        Layout::Channels4,
        Layout::Channels8,
        Layout::Runs16,
    ];
}

/// Which of a call's kernels read its mask, and its shape. Of the vec4
/// kernels only the channels-last ones take a mask, one value per row; any
/// other masked kernel runs the scalar (Generic) form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct MaskUse {
    /// The reducing kernels read it (training statistics, backward reduce).
    pub statistics: bool,
    /// The elementwise kernels read it too (dx; normalise never does).
    pub elementwise: bool,
    /// One value per row of channels: channels last, the channels the
    /// input's last axis.
    pub by_row: bool,
}

impl DispatchPlan {
    pub(crate) fn new(view: ChannelView, dtype: DType, mask: MaskUse, limits: PlanLimits) -> Result<Self> {
        let PlanLimits {
            max_binding, alignment, ..
        } = limits;
        let len = view.len();
        // element indices (and one past the end) are u32 in the kernels
        if len >= u32::MAX as usize {
            return Err(Error::TooLarge(format!(
                "{len} elements exceed the 2^32 a kernel can index"
            )));
        }
        let size = dtype.size() as u64;
        let fits = padded_bytes(len, dtype) <= max_binding;
        // room for a chunk after the misalignment of its start
        let room = (max_binding.saturating_sub(alignment + 4) / size) as usize;
        // channels-last vec4 kernels need chunks of whole rows
        let row_block = lcm(64, view.channels);
        // float16 walks the same layouts, four halves per 8-byte load
        let vec4 = match () {
            _ if view.inner.is_multiple_of(16) => Layout::Inner16,
            _ if view.inner.is_multiple_of(4) => Layout::Inner4,
            _ if view.inner == 1 && view.channels.is_multiple_of(4) && (fits || row_block <= room) => {
                if view.channels.is_multiple_of(8) {
                    Layout::Channels8
                } else {
                    Layout::Channels4
                }
            }
            _ if view.inner >= 16 && len.is_multiple_of(4) => Layout::Runs16,
            _ => Layout::Generic,
        };
        // a kernel that reads the mask keeps its vec4 form only for a mask per row
        let takes_mask = mask.by_row && matches!(vec4, Layout::Channels4 | Layout::Channels8);
        let elementwise = if mask.elementwise && !takes_mask {
            Layout::Generic
        } else {
            vec4
        };
        let stats = match elementwise {
            _ if mask.statistics && !takes_mask => Layout::Generic,
            Layout::Inner16 => Layout::Inner4,
            other => other,
        };
        // chunks start on whole 64-element blocks (float16 words and vec4s
        // stay whole) and, for channels-last vec4s, on whole rows
        let block = if matches!(elementwise, Layout::Channels4 | Layout::Channels8) {
            row_block
        } else {
            64
        };
        let chunk_elems = if fits {
            len
        } else {
            let elems = room / block * block;
            if elems == 0 {
                return Err(Error::TooLarge(format!(
                    "a storage binding of {max_binding} bytes is too small to chunk"
                )));
            }
            elems
        };

        let mut chunks = Vec::new();
        let mut start = 0;
        while start < len {
            let elems = chunk_elems.min(len - start);
            let first = start as u64 * size;
            let end = ((start + elems) as u64 * size).div_ceil(4) * 4;
            let bind_offset = first / alignment * alignment;
            chunks.push(Chunk {
                start,
                elems,
                bind_offset,
                bind_size: end - bind_offset,
                base: ((first - bind_offset) / size) as u32,
                tiles: 0,
                tile_offset: 0,
                stats_grid: (0, 0),
                normalize_grid: (0, 0),
            });
            start += elems;
        }

        // Statistics tiles: each invocation reduces elems_per_thread units
        // (values, vec4s or rows) of one channel (or quad). Each chunk needs
        // enough tiles for its longest channel run.
        let lanes = match stats {
            Layout::Channels4 => view.channels / 4,
            Layout::Channels8 => view.channels / 8,
            _ => view.channels,
        };
        let runs: Vec<usize> = match stats {
            // tiles of values
            Layout::Generic | Layout::Runs16 => chunks
                .iter()
                .map(|c| longest_channel_run(view, c.start, c.start + c.elems))
                .collect(),
            Layout::Inner4 | Layout::Inner16 => chunks
                .iter()
                .map(|c| longest_channel_run(view, c.start, c.start + c.elems) / 4)
                .collect(),
            Layout::Channels4 | Layout::Channels8 => chunks.iter().map(|c| c.elems / view.channels).collect(),
        };
        // enough invocations to fill the device, long enough loops to stream
        let units: usize = runs.iter().sum::<usize>() * lanes;
        let longest = runs.iter().copied().max().unwrap_or(1).max(1);
        // Runs16 tiles are in values but read in vec4s: as long as the others
        let min_per_thread = match stats {
            Layout::Runs16 => 4 * STATS_MIN_PER_THREAD,
            _ => STATS_MIN_PER_THREAD,
        };
        let mut elems_per_thread = units
            .div_ceil(STATS_INVOCATIONS)
            .clamp(min_per_thread, MAX_LOOP)
            .min(longest);
        // very long channels take longer tiles rather than more of them
        while runs.iter().map(|r| r.div_ceil(elems_per_thread).max(1)).sum::<usize>() > MAX_TILES
            && elems_per_thread < MAX_LOOP_LONG
        {
            elems_per_thread *= 2;
        }
        let mut tile_offset = 0;
        for (c, run) in chunks.iter_mut().zip(&runs) {
            c.tiles = run.div_ceil(elems_per_thread).max(1);
            c.tile_offset = tile_offset;
            tile_offset += c.tiles;
        }
        if tile_offset > MAX_TILES {
            return Err(Error::TooLarge(format!(
                "{} values per channel need more than {MAX_TILES} statistics tiles",
                view.per_channel()
            )));
        }
        // the finalize kernels bind every channel's tiles at once
        let partial_bytes = (view.channels as u64).saturating_mul(tile_offset as u64 * 16);
        if partial_bytes > limits.device_binding {
            return Err(Error::TooLarge(format!(
                "{} channels of {tile_offset} statistics tiles need {partial_bytes} bytes of partial sums, \
                 more than one binding of {} bytes",
                view.channels, limits.device_binding
            )));
        }
        let mut plan = DispatchPlan {
            view,
            dtype,
            chunks,
            elementwise,
            stats,
            elems_per_thread,
            total_tiles: tile_offset,
            finalize_grid: grid(finalize_groups(view.channels), limits.max_groups)?,
        };
        for i in 0..plan.chunks.len() {
            let chunk = &plan.chunks[i];
            let stats_grid = grid(plan.stats_groups(chunk), limits.max_groups)?;
            let normalize_grid = grid(plan.normalize_groups(chunk), limits.max_groups)?;
            plan.chunks[i].stats_grid = stats_grid;
            plan.chunks[i].normalize_grid = normalize_grid;
        }
        Ok(plan)
    }

    /// Workgroups of the statistics and backward-reduce kernels: one
    /// invocation per tile and channel (or channel quad).
    fn stats_groups(&self, chunk: &Chunk) -> u64 {
        let lanes = match self.stats {
            Layout::Channels4 => self.view.channels / 4,
            Layout::Channels8 => self.view.channels / 8,
            _ => self.view.channels,
        };
        (chunk.tiles as u64 * lanes as u64).div_ceil(u64::from(WORKGROUP))
    }

    /// Workgroups of the normalise kernel for one chunk.
    fn normalize_groups(&self, chunk: &Chunk) -> u64 {
        let per = NORMALIZE_PER_THREAD as usize;
        let invocations = match (self.elementwise, self.dtype) {
            // one quad of NORMALIZE_ROWS_PER_THREAD rows each (see normalize.wgsl)
            (Layout::Channels4, _) => {
                let rows = chunk.elems / self.view.channels;
                (self.view.channels / 4) * rows.div_ceil(NORMALIZE_ROWS_PER_THREAD as usize)
            }
            (Layout::Channels8, _) => {
                let rows = chunk.elems / self.view.channels;
                (self.view.channels / 8) * rows.div_ceil(NORMALIZE_ROWS_PER_THREAD as usize)
            }
            (Layout::Inner4 | Layout::Inner16 | Layout::Runs16, _) => (chunk.elems / 4).div_ceil(per),
            (Layout::Generic, DType::F32) => chunk.elems.div_ceil(per),
            (Layout::Generic, DType::F16) => chunk.elems.div_ceil(2).div_ceil(per),
        };
        (invocations as u64).div_ceil(u64::from(WORKGROUP))
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_binding: u64) -> PlanLimits {
        PlanLimits {
            max_binding,
            device_binding: 128 << 20,
            alignment: 256,
            max_groups: 65535,
        }
    }

    #[test]
    fn one_chunk_when_it_fits() {
        let view = ChannelView {
            outer: 32,
            channels: 64,
            inner: 3136,
        };
        let mask = MaskUse {
            statistics: true,
            ..Default::default()
        };
        let plan = DispatchPlan::new(view, DType::F32, mask, limits(1 << 27)).unwrap();
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.chunks[0].bind_size, view.len() as u64 * 4);
        assert_eq!(plan.total_tiles, (32usize * 3136).div_ceil(plan.elems_per_thread));
        assert!(plan.elems_per_thread >= 16);
    }

    /// A small tensor is one chunk: its training forward is three
    /// dispatches (statistics, finalize, normalise) in the caller's one
    /// submission, as issue 4 asks.
    #[test]
    fn a_small_tensor_is_one_chunk() {
        let view = ChannelView {
            outer: 64,
            channels: 16,
            inner: 1,
        };
        for dtype in [DType::F32, DType::F16] {
            let plan = DispatchPlan::new(view, dtype, MaskUse::default(), limits(128 << 20)).unwrap();
            assert_eq!(plan.chunks.len(), 1);
        }
    }

    /// Which layout each shape and mask gets: the vec4 layouts for both
    /// dtypes, the channels-last ones also under a mask per row.
    #[test]
    fn layouts_by_shape_and_mask() {
        let view = |outer, channels, inner| ChannelView { outer, channels, inner };
        let cases = [
            // (view, masked, mask by row) -> (elementwise, statistics)
            (view(32, 64, 3136), false, false, Layout::Inner16, Layout::Inner4),
            (view(32, 64, 3136), true, false, Layout::Inner16, Layout::Generic),
            (view(3, 4, 12), false, false, Layout::Inner4, Layout::Inner4),
            (view(100, 64, 1), false, false, Layout::Channels8, Layout::Channels8),
            (view(100, 64, 1), true, true, Layout::Channels8, Layout::Channels8),
            (view(100, 64, 1), true, false, Layout::Channels8, Layout::Generic),
            (view(100, 12, 1), true, true, Layout::Channels4, Layout::Channels4),
            (view(8, 512, 49), false, false, Layout::Runs16, Layout::Runs16),
            (view(8, 512, 49), true, false, Layout::Runs16, Layout::Generic),
            (view(3, 5, 17), false, false, Layout::Generic, Layout::Generic),
            (view(3, 5, 9), false, false, Layout::Generic, Layout::Generic),
            (view(100, 6, 1), false, false, Layout::Generic, Layout::Generic),
        ];
        for (v, masked, by_row, elementwise, stats) in cases {
            for dtype in [DType::F32, DType::F16] {
                // a forward call: the statistics read the mask, normalise does not
                let mask = MaskUse {
                    statistics: masked,
                    elementwise: false,
                    by_row,
                };
                let plan = DispatchPlan::new(v, dtype, mask, limits(1 << 27)).unwrap();
                assert_eq!(
                    (plan.elementwise, plan.stats),
                    (elementwise, stats),
                    "{v:?} masked {masked} {dtype}"
                );
            }
        }
        // a masked backward call: dx reads the mask too
        for (v, by_row, layout) in [
            (view(100, 64, 1), true, Layout::Channels8),
            (view(100, 12, 1), true, Layout::Channels4),
            (view(100, 64, 1), false, Layout::Generic),
            (view(32, 64, 3136), false, Layout::Generic),
            (view(8, 512, 49), false, Layout::Generic),
        ] {
            let mask = MaskUse {
                statistics: true,
                elementwise: true,
                by_row,
            };
            let plan = DispatchPlan::new(v, DType::F32, mask, limits(1 << 27)).unwrap();
            assert_eq!((plan.elementwise, plan.stats), (layout, layout), "{v:?} backward");
        }
    }

    #[test]
    fn chunks_cover_every_element_once_and_fit() {
        for (dtype, view) in [
            (
                DType::F32,
                ChannelView {
                    outer: 1001,
                    channels: 3,
                    inner: 7,
                },
            ),
            (
                DType::F16,
                ChannelView {
                    outer: 1001,
                    channels: 3,
                    inner: 7,
                },
            ),
            (
                DType::F16,
                ChannelView {
                    outer: 1,
                    channels: 4001,
                    inner: 3,
                },
            ),
            (
                DType::F32,
                ChannelView {
                    outer: 1,
                    channels: 1,
                    inner: 100_003,
                },
            ),
        ] {
            let max = 4096;
            let plan = DispatchPlan::new(view, dtype, MaskUse::default(), limits(max)).unwrap();
            assert!(plan.chunks.len() > 1);
            let mut next = 0;
            for c in &plan.chunks {
                assert_eq!(c.start, next);
                assert!(c.bind_size <= max, "{c:?}");
                assert_eq!(c.bind_offset % 256, 0);
                assert_eq!(c.bind_size % 4, 0);
                assert!(c.bind_offset + c.bind_size <= padded_bytes(view.len(), dtype));
                if dtype == DType::F16 {
                    assert_eq!(c.base % 2, 0);
                }
                next += c.elems;
            }
            assert_eq!(next, view.len());
        }
    }

    #[test]
    fn longest_run_counts_every_channel_exactly() {
        let view = ChannelView {
            outer: 5,
            channels: 4,
            inner: 3,
        };
        for start in 0..view.len() {
            for end in start..=view.len() {
                let brute = (0..view.channels)
                    .map(|c| (start..end).filter(|&e| view.channel_of(e) == c).count())
                    .max()
                    .unwrap();
                assert_eq!(longest_channel_run(view, start, end), brute, "{start}..{end}");
            }
        }
    }

    #[test]
    fn a_binding_too_small_to_chunk_is_an_error() {
        let view = ChannelView {
            outer: 2,
            channels: 4096,
            inner: 1,
        };
        assert!(matches!(
            DispatchPlan::new(view, DType::F32, MaskUse::default(), limits(256)),
            Err(Error::TooLarge(_))
        ));
    }

    /// A channel may hold any number of values a kernel can index: 2^28
    /// values of one channel (a 1 GiB float32 input) and just under 2^32
    /// plan within every loop bound, as do layers wider than 2^19 channels.
    #[test]
    fn long_channels_and_wide_layers_plan_within_the_loop_bounds() {
        let view = |outer, channels, inner| ChannelView { outer, channels, inner };
        for (v, dtype) in [
            (view(268_435_456, 1, 1), DType::F32),
            (view(1, 1, 268_435_456), DType::F32),
            (view(4_294_967_000, 1, 1), DType::F16),
            (view(1, 3, 1_431_655_000), DType::F16),
            (view(3, 1_000_003, 1), DType::F32),
            (view(3, 1 << 20, 1), DType::F16),
            (view(2, 524_281, 1), DType::F32),
        ] {
            let plan = DispatchPlan::new(v, dtype, MaskUse::default(), limits(128 << 20))
                .unwrap_or_else(|e| panic!("{v:?} {dtype}: {e}"));
            assert!(plan.total_tiles <= MAX_TILES, "{v:?}");
            assert!(plan.elems_per_thread <= MAX_LOOP_LONG, "{v:?}");
            assert!(plan.total_tiles.div_ceil(8) < 65535, "{v:?}");
            let groups = |g: (u32, u32)| u64::from(g.0) * u64::from(g.1);
            assert!(groups(plan.finalize_grid) >= (v.channels as u64).div_ceil(8));
            for c in &plan.chunks {
                for g in [c.stats_grid, c.normalize_grid, plan.finalize_grid] {
                    assert!(g.0 >= 1 && g.0 <= 65535 && g.1 >= 1 && g.1 <= 65535, "{v:?}: {g:?}");
                }
            }
        }
    }

    /// A device with fewer workgroups per dimension gets grids within its
    /// limit, and an error where no grid fits.
    #[test]
    fn grids_follow_the_device_limit() {
        let v = ChannelView {
            outer: 3,
            channels: 1_000_003,
            inner: 1,
        };
        let small = PlanLimits {
            max_groups: 1024,
            ..limits(128 << 20)
        };
        let plan = DispatchPlan::new(v, DType::F32, MaskUse::default(), small).unwrap();
        assert!(plan.finalize_grid.0 <= 1024 && plan.finalize_grid.1 <= 1024);
        let tiny = PlanLimits {
            max_groups: 8,
            ..limits(128 << 20)
        };
        assert!(matches!(
            DispatchPlan::new(v, DType::F32, MaskUse::default(), tiny),
            Err(Error::TooLarge(_))
        ));
    }
}
