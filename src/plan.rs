//! Dispatch plans: how one input is cut into chunks that fit a storage
//! binding, and into statistics tiles.

use crate::config::ChannelView;
use crate::dtype::{DType, padded_bytes};
use crate::error::{Error, Result};
use crate::tuning::{PlanTuning, Strategy};
use crate::variants::{Kernel, KernelKey, Layout, Variant, WORKGROUP};

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
/// Coalesced reductions: the fewest steps a lane takes down its tile
/// (shorter tiles spend more on the workgroup reduction than on loads).
const COALESCED_MIN_STEPS: usize = 4;

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
    /// Coalesced elementwise kernels: how many times each invocation
    /// strides over the chunk (the grid's invocations apart).
    pub elementwise_steps: u32,
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
    /// The knobs the plan was made with (its kernel family among them).
    pub tuning: PlanTuning,
    /// Coalesced channels-last reductions: lanes across a row (a power of
    /// two; `WORKGROUP / lane_width` rows at a time) and workgroups across
    /// the row's columns (channels or channel quads).
    pub lane_width: u32,
    pub column_blocks: u32,
}

/// Mirror of `first_j_at` in `shaders/channel_tiles.wgsl`: the first position
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
    pub(crate) fn new(
        view: ChannelView,
        dtype: DType,
        mask: MaskUse,
        limits: PlanLimits,
        tuning: &PlanTuning,
    ) -> Result<Self> {
        tuning.validate()?;
        let PlanLimits {
            max_binding, alignment, ..
        } = limits;
        let len = view.len();
        // element indices (and one past the end) are u32 in the kernels
        if len >= u32::MAX as usize {
            return Err(Error::too_large(
                "kernel indices",
                format!("{len} elements exceed the 2^32 a kernel can index"),
            ));
        }
        let size = dtype.size() as u64;
        let fits = padded_bytes(len, dtype) <= max_binding;
        // room for a chunk after the misalignment of its start
        let room = (max_binding.saturating_sub(alignment + 4) / size) as usize;
        // channels-last vec4 kernels need chunks of whole rows
        let row_block = lcm(64, view.channels);
        // float16 walks the same layouts, four halves per 8-byte load
        // a serial elementwise invocation's run of values: Inner16 needs it
        // inside one channel, Runs16 within two
        let run = match tuning.strategy {
            Strategy::Serial => (4 * tuning.values_per_thread as usize).max(16),
            Strategy::Coalesced => 16,
        };
        let vec4 = match () {
            _ if view.inner.is_multiple_of(run) => Layout::Inner16,
            _ if view.inner.is_multiple_of(4) => Layout::Inner4,
            _ if view.inner == 1 && view.channels.is_multiple_of(4) && (fits || row_block <= room) => {
                if view.channels.is_multiple_of(8) {
                    Layout::Channels8
                } else {
                    Layout::Channels4
                }
            }
            _ if view.inner >= run && len.is_multiple_of(4) => Layout::Runs16,
            _ => Layout::Generic,
        };
        // a kernel that reads the mask keeps its vec4 form only for a mask per row
        let takes_mask = mask.by_row && matches!(vec4, Layout::Channels4 | Layout::Channels8);
        let elementwise = if mask.elementwise && !takes_mask {
            Layout::Generic
        } else {
            vec4
        };
        let coalesced = tuning.strategy == Strategy::Coalesced;
        let stats = match elementwise {
            _ if mask.statistics && !takes_mask => Layout::Generic,
            Layout::Inner16 => Layout::Inner4,
            other => other,
        };
        // the coalesced family reads channels last across rows, any width
        let stats = match stats {
            Layout::Generic if coalesced && view.inner == 1 => Layout::Rows1,
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
                return Err(Error::too_large(
                    "max_storage_buffer_binding_size",
                    format!("a storage binding of {max_binding} bytes is too small to chunk"),
                ));
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
                elementwise_steps: 0,
            });
            start += elems;
        }

        let (runs, elems_per_thread, lane_width, column_blocks) = if coalesced {
            coalesced_tiles(view, stats, &chunks, tuning)
        } else {
            serial_tiles(view, stats, &chunks, tuning)
        };
        let mut tile_offset = 0;
        for (c, run) in chunks.iter_mut().zip(&runs) {
            c.tiles = run.div_ceil(elems_per_thread).max(1);
            c.tile_offset = tile_offset;
            tile_offset += c.tiles;
        }
        if tile_offset > MAX_TILES {
            return Err(Error::too_large(
                "statistics tiles",
                format!(
                    "{} values per channel need more than {MAX_TILES} statistics tiles",
                    view.per_channel()
                ),
            ));
        }
        // the finalize kernels bind every channel's tiles at once
        let partial_bytes = (view.channels as u64).saturating_mul(tile_offset as u64 * 16);
        if partial_bytes > limits.device_binding {
            return Err(Error::too_large(
                "max_storage_buffer_binding_size",
                format!(
                    "{} channels of {tile_offset} statistics tiles need {partial_bytes} bytes of partial sums, \
                 more than one binding of {} bytes",
                    view.channels, limits.device_binding
                ),
            ));
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
            tuning: *tuning,
            lane_width,
            column_blocks,
        };
        for i in 0..plan.chunks.len() {
            let chunk = &plan.chunks[i];
            let stats_grid = grid(plan.stats_groups(chunk), limits.max_groups)?;
            let normalize_grid = grid(plan.normalize_groups(chunk), limits.max_groups)?;
            // a coalesced invocation strides by the whole grid it runs in
            let grid_invocations = u64::from(normalize_grid.0) * u64::from(normalize_grid.1) * u64::from(WORKGROUP);
            let steps = (plan.elementwise_units(chunk) as u64).div_ceil(grid_invocations);
            if coalesced && steps > MAX_LOOP as u64 {
                return Err(Error::too_large(
                    "loop bound",
                    format!("{steps} elementwise steps per invocation exceed the loop bound {MAX_LOOP}"),
                ));
            }
            plan.chunks[i].stats_grid = stats_grid;
            plan.chunks[i].normalize_grid = normalize_grid;
            plan.chunks[i].elementwise_steps = steps as u32;
        }
        Ok(plan)
    }

    pub(crate) fn strategy(&self) -> Strategy {
        self.tuning.strategy
    }

    /// Mirror of the coalesced reductions' lane layout
    /// (`shaders/coalesced_lanes.wgsl`): the absolute index of the first
    /// element lane `lane` of workgroup `group` reads at its step `step` of
    /// `chunk`, or `None` where that lane reads nothing.
    #[cfg(test)]
    pub(crate) fn coalesced_element(&self, chunk: &Chunk, group: usize, lane: usize, step: usize) -> Option<usize> {
        let wg = WORKGROUP as usize;
        let view = self.view;
        match self.stats {
            Layout::Rows1 | Layout::Channels4 | Layout::Channels8 => {
                let width = self.lane_width as usize;
                let (block, tile) = (group % self.column_blocks as usize, group / self.column_blocks as usize);
                let rows = chunk_rows(view, chunk);
                let r0 = (tile * self.elems_per_thread).min(rows);
                let r1 = (r0 + self.elems_per_thread).min(rows);
                let col = block * width + lane % width;
                let r = r0 + lane / width + step * (wg / width);
                let row = chunk.start / view.channels + r;
                let (a, columns) = if self.stats == Layout::Rows1 {
                    (row * view.channels + col, view.channels)
                } else {
                    (4 * (row * view.channels / 4 + col), view.channels / 4)
                };
                (r < r1 && col < columns && (chunk.start..chunk.start + chunk.elems).contains(&a)).then_some(a)
            }
            _ => {
                let (c, tile) = (group % view.channels, group / view.channels);
                let j_end = first_j_at(view, chunk.start + chunk.elems, c);
                let j0 = (first_j_at(view, chunk.start, c) + tile * self.elems_per_thread).min(j_end);
                let j1 = (j0 + self.elems_per_thread).min(j_end);
                let per_lane = if self.stats == Layout::Inner4 { 4 } else { 1 };
                let j = j0 + per_lane * (lane + step * wg);
                let element = ((j / view.inner) * view.channels + c) * view.inner + j % view.inner;
                (j < j1).then_some(element)
            }
        }
    }

    /// Workgroups of the statistics and backward-reduce kernels. Serial:
    /// one invocation per tile and channel (or channel quad). Coalesced: one
    /// workgroup per tile and channel (runs) or per tile and block of
    /// `lane_width` columns (rows).
    fn stats_groups(&self, chunk: &Chunk) -> u64 {
        let tiles = chunk.tiles as u64;
        if self.strategy() == Strategy::Coalesced {
            return match self.stats {
                Layout::Rows1 | Layout::Channels4 | Layout::Channels8 => tiles * u64::from(self.column_blocks),
                _ => tiles * self.view.channels as u64,
            };
        }
        let lanes = match self.stats {
            Layout::Channels4 => self.view.channels / 4,
            Layout::Channels8 => self.view.channels / 8,
            _ => self.view.channels,
        };
        (tiles * lanes as u64).div_ceil(u64::from(WORKGROUP))
    }

    /// What one coalesced elementwise step handles: vec4s, or scalars
    /// (float32) or words of two halves (float16).
    fn elementwise_units(&self, chunk: &Chunk) -> usize {
        match (self.elementwise, self.dtype) {
            (Layout::Generic | Layout::Rows1, DType::F32) => chunk.elems,
            (Layout::Generic | Layout::Rows1, DType::F16) => chunk.elems.div_ceil(2),
            _ => chunk.elems / 4,
        }
    }

    /// Workgroups of the normalise and dx kernels for one chunk.
    fn normalize_groups(&self, chunk: &Chunk) -> u64 {
        let units = self.elementwise_units(chunk);
        let per = self.tuning.values_per_thread as usize;
        let rows_per = self.tuning.rows_per_thread as usize;
        let invocations = match (self.strategy(), self.elementwise) {
            // enough to fill the device, few enough strides to stay bounded
            (Strategy::Coalesced, _) => units
                .min(self.tuning.elementwise_invocations as usize)
                .max(units.div_ceil(MAX_LOOP)),
            // one quad of rows_per_thread rows each (see walk_values.wgsl)
            (Strategy::Serial, Layout::Channels4) => {
                let rows = chunk.elems / self.view.channels;
                (self.view.channels / 4) * rows.div_ceil(rows_per)
            }
            (Strategy::Serial, Layout::Channels8) => {
                let rows = chunk.elems / self.view.channels;
                (self.view.channels / 8) * rows.div_ceil(rows_per)
            }
            (Strategy::Serial, _) => units.div_ceil(per),
        };
        (invocations as u64).div_ceil(u64::from(WORKGROUP))
    }
}

/// What one dispatch of a call runs over: each chunk of the input (with
/// the chunk's own uniform slot and grid) or every channel once (the
/// finalize kernels, with the first slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    Chunks,
    Channels,
}

/// One dispatch of a call: the kernel variant and what it runs over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dispatch {
    pub key: KernelKey,
    pub over: Over,
}

/// Which part of a call a plan records: the whole call in one submission,
/// or a synchronized call's two submissions around its exchange: the first
/// reduces this rank's values to one partial a channel (`FLAG_MERGE_ONLY`),
/// the second runs from the merged partials (one tile a channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Whole,
    Reduce,
    FromMerged,
}

/// A call planned as data, before anything is recorded: how its input is
/// cut (chunks, tiles, layouts, grids) and every dispatch, in order. The
/// layer's recorder turns it into passes, bind groups and dispatches.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CallPlan {
    pub cut: DispatchPlan,
    pub dispatches: Vec<Dispatch>,
}

impl CallPlan {
    /// A forward call: statistics and finalize where the call normalises
    /// with batch statistics, finalize alone for inference, then the
    /// normalise pass (none for an empty synchronized batch).
    pub(crate) fn forward(
        cut: DispatchPlan,
        variant: &Variant,
        batch_statistics: bool,
        empty: bool,
        phase: Phase,
    ) -> Self {
        let kernels: &[Kernel] = match phase {
            Phase::Whole if batch_statistics => &[Kernel::PartialStats, Kernel::Finalize, Kernel::Normalize],
            Phase::Whole | Phase::FromMerged => &[Kernel::Finalize, Kernel::Normalize],
            Phase::Reduce => &[Kernel::PartialStats, Kernel::Finalize],
        };
        CallPlan::of(cut, variant, kernels, empty, phase)
    }

    /// A backward call: the reduction, its finalize, then dx.
    pub(crate) fn backward(cut: DispatchPlan, variant: &Variant, empty: bool, phase: Phase) -> Self {
        let kernels: &[Kernel] = match phase {
            Phase::Whole => &[Kernel::BackwardReduce, Kernel::BackwardFinalize, Kernel::BackwardDx],
            Phase::Reduce => &[Kernel::BackwardReduce, Kernel::BackwardFinalize],
            Phase::FromMerged => &[Kernel::BackwardFinalize, Kernel::BackwardDx],
        };
        CallPlan::of(cut, variant, kernels, empty, phase)
    }

    fn of(mut cut: DispatchPlan, variant: &Variant, kernels: &[Kernel], empty: bool, phase: Phase) -> Self {
        if phase == Phase::FromMerged {
            // the finalize kernels read one merged partial a channel
            cut.total_tiles = 1;
        }
        let dispatches = kernels
            .iter()
            .filter(|k| !(empty && k.is_elementwise()))
            .map(|&kernel| {
                let (layout, over) = match kernel {
                    Kernel::PartialStats | Kernel::BackwardReduce => (cut.stats, Over::Chunks),
                    Kernel::Normalize | Kernel::BackwardDx => (cut.elementwise, Over::Chunks),
                    _ => (Layout::Generic, Over::Channels),
                };
                Dispatch {
                    key: KernelKey::of(kernel, layout, variant),
                    over,
                }
            })
            .collect();
        CallPlan { cut, dispatches }
    }

    /// The grid of one dispatch over one chunk (or over the channels).
    pub(crate) fn grid(&self, dispatch: &Dispatch, chunk: &Chunk) -> (u32, u32) {
        match (dispatch.over, dispatch.key.kernel) {
            (Over::Channels, _) => self.cut.finalize_grid,
            (Over::Chunks, Kernel::PartialStats | Kernel::BackwardReduce) => chunk.stats_grid,
            (Over::Chunks, _) => chunk.normalize_grid,
        }
    }
}

type Tiles = (Vec<usize>, usize, u32, u32);

/// Serial statistics tiles: each invocation reduces elems_per_thread units
/// (values, vec4s or rows) of one channel (or quad). Each chunk needs
/// enough tiles for its longest channel run. Returns the runs per chunk in
/// units, the units per tile, and no lane layout.
fn serial_tiles(view: ChannelView, stats: Layout, chunks: &[Chunk], tuning: &PlanTuning) -> Tiles {
    let lanes = match stats {
        Layout::Channels4 => view.channels / 4,
        Layout::Channels8 => view.channels / 8,
        _ => view.channels,
    };
    let runs: Vec<usize> = match stats {
        // tiles of values
        Layout::Generic | Layout::Runs16 | Layout::Rows1 => chunks
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
        .div_ceil(tuning.reduce_invocations as usize)
        .clamp(min_per_thread, MAX_LOOP)
        .min(longest);
    // very long channels take longer tiles rather than more of them
    while runs.iter().map(|r| r.div_ceil(elems_per_thread).max(1)).sum::<usize>() > MAX_TILES
        && elems_per_thread < MAX_LOOP_LONG
    {
        elems_per_thread *= 2;
    }
    (runs, elems_per_thread, 0, 0)
}

/// Rows of the chunk a channels-last kernel walks: from the row of its
/// first element to that of its last (a chunk may start or end inside a
/// row; the kernels skip the elements outside it).
fn chunk_rows(view: ChannelView, chunk: &Chunk) -> usize {
    if chunk.elems == 0 {
        return 0;
    }
    (chunk.start + chunk.elems - 1) / view.channels - chunk.start / view.channels + 1
}

/// The units of a coalesced tile: a channel's `longest` run cut into
/// about `tiles_wanted` tiles (at least one) of whole steps of `stride`
/// units, at least COALESCED_MIN_STEPS steps (where the run has them) and
/// at most MAX_LOOP.
fn coalesced_tile(longest: usize, tiles_wanted: usize, stride: usize) -> usize {
    let steps = longest
        .div_ceil(tiles_wanted.max(1))
        .div_ceil(stride)
        .max(COALESCED_MIN_STEPS)
        .min(longest.div_ceil(stride))
        .clamp(1, MAX_LOOP);
    steps * stride
}

/// Coalesced statistics tiles: a workgroup reduces one tile. Channels last
/// (Rows1, Channels4/8): `lane_width` lanes across a block of a row's
/// columns (channels or quads), the other lanes down the tile's rows; runs
/// (the rest): all 256 lanes along one channel's run. Tiles are sized so
/// that the grid holds about `reduce_invocations` lanes and every lane
/// takes at least a few steps (at most MAX_LOOP). Returns tiles in rows or
/// in positions of a channel (values; vec4s x 4 for Inner4).
fn coalesced_tiles(view: ChannelView, stats: Layout, chunks: &[Chunk], tuning: &PlanTuning) -> Tiles {
    let wg = WORKGROUP as usize;
    let groups_wanted = (tuning.reduce_invocations as usize).div_ceil(wg).max(1);
    match stats {
        Layout::Rows1 | Layout::Channels4 | Layout::Channels8 => {
            let columns = if stats == Layout::Rows1 {
                view.channels
            } else {
                view.channels / 4
            };
            let lane_width = columns.next_power_of_two().min(tuning.lane_width as usize).min(wg);
            let row_lanes = wg / lane_width;
            let blocks = columns.div_ceil(lane_width);
            let runs: Vec<usize> = chunks.iter().map(|c| chunk_rows(view, c)).collect();
            let longest = runs.iter().copied().max().unwrap_or(1).max(1);
            let tile = coalesced_tile(longest, groups_wanted / blocks, row_lanes);
            (runs, tile, lane_width as u32, blocks as u32)
        }
        _ => {
            // tiles in positions; Inner4 lanes take four at a time
            let per_lane = if stats == Layout::Inner4 { 4 } else { 1 };
            let runs: Vec<usize> = chunks
                .iter()
                .map(|c| longest_channel_run(view, c.start, c.start + c.elems))
                .collect();
            let longest = runs.iter().copied().max().unwrap_or(1).max(1);
            let tile = coalesced_tile(longest, groups_wanted / view.channels, wg * per_lane);
            (runs, tile, 0, 0)
        }
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

/// Workgroups of the finalize kernels: eight invocations per channel,
/// eight channels per workgroup (`LANES` in finalize_lanes.wgsl).
pub(crate) fn finalize_groups(channels: usize) -> u64 {
    channels.div_ceil(8) as u64
}

/// A 2-D grid of at least `groups` workgroups with neither dimension above
/// `max` (the device's `max_compute_workgroups_per_dimension`, 65535 in
/// WebGPU); the kernels number workgroups `wid.x + wid.y * x` and skip
/// those past their work. Checked here, on the host: a grid the device
/// cannot run is an error, never a dispatch.
pub(crate) fn grid(groups: u64, max: u32) -> Result<(u32, u32)> {
    // Plain divisions, no clamp: rustc 1.95's LLVM miscompiles
    // `if g <= 65535 { g.max(1) } else { 65535 }` (65536 for 65536).
    let max = u64::from(max);
    let y = groups.saturating_sub(1) / max + 1;
    let x = groups.saturating_sub(1) / y + 1;
    if x > max || y > max || x * y < groups {
        return Err(Error::too_large(
            "max_compute_workgroups_per_dimension",
            format!("{groups} workgroups do not fit a grid of {max} x {max} (max_compute_workgroups_per_dimension)"),
        ));
    }
    Ok((x as u32, y as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_every_workgroup() {
        // the unit tests build at opt-level 1, where the old clamp shape
        // returned 65536 for 65536
        for max in [65535, 1000, 1] {
            for groups in [
                0,
                1,
                2,
                999,
                1000,
                1001,
                65534,
                65535,
                65536,
                65537,
                200_000,
                524_281 / 8 + 1,
            ] {
                let Ok((x, y)) = grid(std::hint::black_box(groups), std::hint::black_box(max)) else {
                    assert!(groups > u64::from(max) * u64::from(max), "{groups} in {max}");
                    continue;
                };
                let (x, y) = (u64::from(x), u64::from(y));
                assert!(x >= 1 && y >= 1, "{groups}: {x} x {y}");
                assert!(
                    x <= u64::from(max) && y <= u64::from(max),
                    "{groups} in {max}: {x} x {y}"
                );
                assert!(x * y >= groups, "{groups}: {x} x {y}");
            }
        }
        assert!(grid(65535 * 65535 + 1, 65535).is_err());
        assert_eq!(grid(65536, 65535).unwrap(), (32768, 2));
    }

    fn serial() -> PlanTuning {
        PlanTuning::default_for(Strategy::Serial)
    }

    fn coalesced() -> PlanTuning {
        PlanTuning::default_for(Strategy::Coalesced)
    }

    /// A call is planned as data without a device: its dispatches, their
    /// variants (among those every context precompiles) and grids.
    #[test]
    fn calls_are_planned_without_a_device() {
        use crate::variants::Kernel as K;
        for strategy in [Strategy::Serial, Strategy::Coalesced] {
            let tuning = PlanTuning::default_for(strategy);
            for (shape, axis, masked) in [
                (&[300usize, 12][..], 1, false),
                (&[4, 6, 49][..], 1, true),
                (&[64, 6][..], 1, true),
            ] {
                let view = ChannelView::new(shape, axis);
                let mask = MaskUse {
                    statistics: masked,
                    elementwise: masked,
                    by_row: view.inner == 1,
                };
                let variant = Variant {
                    dtype: DType::F32,
                    masked,
                    tuning,
                    subgroups: true,
                    uniform_affine: false,
                    uniform_coeffs: false,
                    relu: false,
                };
                let cut = DispatchPlan::new(view, DType::F32, mask, limits(1 << 27), &tuning).unwrap();
                let kernels = |plan: &CallPlan| plan.dispatches.iter().map(|d| d.key.kernel).collect::<Vec<_>>();
                let known = KernelKey::layer_variants(&tuning, true, false);
                let training = CallPlan::forward(cut.clone(), &variant, true, false, Phase::Whole);
                assert_eq!(kernels(&training), [K::PartialStats, K::Finalize, K::Normalize]);
                let inference = CallPlan::forward(cut.clone(), &variant, false, false, Phase::Whole);
                assert_eq!(kernels(&inference), [K::Finalize, K::Normalize]);
                let backward = CallPlan::backward(cut.clone(), &variant, false, Phase::Whole);
                assert_eq!(
                    kernels(&backward),
                    [K::BackwardReduce, K::BackwardFinalize, K::BackwardDx]
                );
                for plan in [&training, &inference, &backward] {
                    for d in &plan.dispatches {
                        assert!(
                            known.contains(&d.key),
                            "{shape:?} {strategy}: {:?} is never precompiled",
                            d.key
                        );
                        for chunk in &plan.cut.chunks {
                            let (x, y) = plan.grid(d, chunk);
                            assert!(x >= 1 && y >= 1, "{:?}", d.key);
                        }
                    }
                }
                assert_eq!(
                    training.dispatches[0].key.layout,
                    KernelKey::of(K::PartialStats, cut.stats, &variant).layout
                );
                // a synchronized call: reduce, then from one merged tile a channel
                let reduce = CallPlan::forward(cut.clone(), &variant, true, false, Phase::Reduce);
                assert_eq!(kernels(&reduce), [K::PartialStats, K::Finalize]);
                let merged = CallPlan::backward(cut.clone(), &variant, false, Phase::FromMerged);
                assert_eq!(kernels(&merged), [K::BackwardFinalize, K::BackwardDx]);
                assert_eq!(merged.cut.total_tiles, 1);
                // an empty rank runs its per-channel kernels only
                let empty = CallPlan::forward(cut, &variant, true, true, Phase::FromMerged);
                assert_eq!(kernels(&empty), [K::Finalize]);
            }
        }
    }

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
        let plan = DispatchPlan::new(view, DType::F32, mask, limits(1 << 27), &serial()).unwrap();
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
            let plan = DispatchPlan::new(view, dtype, MaskUse::default(), limits(128 << 20), &serial()).unwrap();
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
                let plan = DispatchPlan::new(v, dtype, mask, limits(1 << 27), &serial()).unwrap();
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
            let plan = DispatchPlan::new(v, DType::F32, mask, limits(1 << 27), &serial()).unwrap();
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
            let plan = DispatchPlan::new(view, dtype, MaskUse::default(), limits(max), &serial()).unwrap();
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
            DispatchPlan::new(view, DType::F32, MaskUse::default(), limits(256), &serial()),
            Err(Error::TooLarge { .. })
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
            for tuning in [serial(), coalesced()] {
                let plan = DispatchPlan::new(v, dtype, MaskUse::default(), limits(128 << 20), &tuning)
                    .unwrap_or_else(|e| panic!("{v:?} {dtype}: {e}"));
                assert!(plan.total_tiles <= MAX_TILES, "{v:?}");
                // serial: one invocation's loop; coalesced: a tile of 256 lanes' loops
                let longest_loop = match tuning.strategy {
                    Strategy::Serial => MAX_LOOP_LONG,
                    Strategy::Coalesced => MAX_LOOP * 4 * WORKGROUP as usize,
                };
                assert!(plan.elems_per_thread <= longest_loop, "{v:?}");
                assert!(plan.total_tiles.div_ceil(8) < 65535, "{v:?}");
                let groups = |g: (u32, u32)| u64::from(g.0) * u64::from(g.1);
                assert!(groups(plan.finalize_grid) >= (v.channels as u64).div_ceil(8));
                for c in &plan.chunks {
                    for g in [c.stats_grid, c.normalize_grid, plan.finalize_grid] {
                        assert!(g.0 >= 1 && g.0 <= 65535 && g.1 >= 1 && g.1 <= 65535, "{v:?}: {g:?}");
                    }
                    assert!(c.elementwise_steps as usize <= MAX_LOOP, "{v:?}");
                }
            }
        }
    }

    /// `tile_span` of shaders/channel_tiles.wgsl in its own u32 arithmetic.
    fn tile_span_u32(view: ChannelView, chunk: &Chunk, c: usize, tile: u32, per_tile: u32) -> (u32, u32) {
        let first = |a: usize| first_j_at(view, a, c) as u32;
        let j_end = first(chunk.start + chunk.elems);
        let j0 = first(chunk.start).wrapping_add(tile.wrapping_mul(per_tile)).min(j_end);
        (j0, j0.wrapping_add(per_tile.min(j_end.wrapping_sub(j0))))
    }

    /// A channel whose positions come within a tile of 2^32: the shaders'
    /// tile spans (in u32) never wrap, and cover the channel's run.
    #[test]
    fn tile_spans_do_not_wrap_near_2_pow_32() {
        let view = ChannelView {
            outer: 1,
            channels: 1,
            inner: 4_294_967_000,
        };
        for tuning in [serial(), coalesced()] {
            let plan = DispatchPlan::new(view, DType::F16, MaskUse::default(), limits(128 << 20), &tuning).unwrap();
            let last = plan.chunks.last().unwrap();
            let per_tile = (plan.elems_per_thread
                * if plan.stats == Layout::Inner4 && tuning.strategy == Strategy::Serial {
                    4
                } else {
                    1
                }) as u32;
            let mut covered = 0u64;
            for t in 0..last.tiles as u32 {
                let (j0, j1) = tile_span_u32(view, last, 0, t, per_tile);
                assert!(
                    j0 <= j1 && j1 - j0 <= per_tile,
                    "{:?} tile {t}: {j0}..{j1}",
                    tuning.strategy
                );
                covered += u64::from(j1 - j0);
            }
            assert_eq!(covered, last.elems as u64, "{:?}", tuning.strategy);
        }
    }

    /// A serial plan with longer elementwise invocations takes Inner16 and
    /// Runs16 only where an invocation's values stay within one channel
    /// (two for Runs16).
    #[test]
    fn serial_invocation_length_limits_the_vec4_layouts() {
        let view = |outer, channels, inner| ChannelView { outer, channels, inner };
        let long = PlanTuning {
            values_per_thread: 8,
            ..serial()
        };
        for (v, layout) in [
            (view(3, 4, 16), Layout::Inner4),
            (view(3, 4, 32), Layout::Inner16),
            (view(3, 4, 21), Layout::Generic),
            (view(4, 4, 33), Layout::Runs16),
        ] {
            let plan = DispatchPlan::new(v, DType::F32, MaskUse::default(), limits(1 << 27), &long).unwrap();
            assert_eq!(plan.elementwise, layout, "{v:?}");
        }
    }

    /// Limits of a typical discrete Vulkan GPU.
    fn discrete_gpu() -> PlanLimits {
        PlanLimits {
            max_binding: (1 << 31) - 1,
            device_binding: (1 << 31) - 1,
            alignment: 64,
            max_groups: 65535,
        }
    }

    /// On a discrete GPU the coalesced statistics of the benchmark's
    /// ResNet shapes fill the device (at least 128K invocations) and
    /// neighbouring lanes of a workgroup read neighbouring 16-byte words.
    #[test]
    fn coalesced_statistics_fill_a_gpu_and_read_neighbouring_words() {
        let view = |outer, channels, inner| ChannelView { outer, channels, inner };
        for (v, layout) in [
            (view(32 * 56 * 56, 64, 1), Layout::Channels8),
            (view(32, 64, 56 * 56), Layout::Inner4),
        ] {
            let plan = DispatchPlan::new(v, DType::F32, MaskUse::default(), discrete_gpu(), &coalesced()).unwrap();
            assert_eq!(plan.stats, layout, "{v:?}");
            assert_eq!(plan.chunks.len(), 1);
            let chunk = &plan.chunks[0];
            let groups = u64::from(chunk.stats_grid.0) * u64::from(chunk.stats_grid.1);
            assert!(
                groups * u64::from(WORKGROUP) >= 128 * 1024,
                "{v:?}: {groups} workgroups"
            );
            // lanes of one subgroup (32 here) at each step, in a few workgroups
            for group in [0, 1, plan.stats_groups(chunk) as usize / 2] {
                for step in 0..2 {
                    for lane in 0..31 {
                        let a = plan.coalesced_element(chunk, group, lane, step).unwrap();
                        let b = plan.coalesced_element(chunk, group, lane + 1, step).unwrap();
                        assert_eq!(b, a + 4, "{v:?}: group {group} lane {lane} step {step}");
                    }
                }
            }
            // every element is read exactly once over the grid
            let mut seen = vec![0u8; v.len() / 4];
            for group in 0..plan.stats_groups(chunk) as usize {
                for lane in 0..WORKGROUP as usize {
                    for step in 0..MAX_LOOP {
                        // past step 0 (a chunk's partial first row), nothing more follows a miss
                        match plan.coalesced_element(chunk, group, lane, step) {
                            Some(a) => seen[a / 4] += 1,
                            None if step > 0 => break,
                            None => {}
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{v:?}");
        }
        // the elementwise kernels fill it too
        let plan = DispatchPlan::new(
            view(32, 64, 3136),
            DType::F32,
            MaskUse::default(),
            discrete_gpu(),
            &coalesced(),
        )
        .unwrap();
        let g = plan.chunks[0].normalize_grid;
        assert!(u64::from(g.0) * u64::from(g.1) * u64::from(WORKGROUP) >= 128 * 1024);
    }

    /// The coalesced tiles cover every element of every chunk exactly once,
    /// for the awkward shapes: partial rows at chunk edges, rows narrower
    /// than the lanes, channels not a multiple of 4, masks.
    #[test]
    fn coalesced_tiles_cover_every_element_once() {
        let view = |outer, channels, inner| ChannelView { outer, channels, inner };
        for (v, mask, max) in [
            (view(1001, 3, 1), MaskUse::default(), 1 << 27),
            (view(1001, 3, 1), MaskUse::default(), 4096),
            (view(517, 12, 1), MaskUse::default(), 4096),
            (view(300, 64, 1), MaskUse::default(), 1 << 27),
            (view(7, 5, 9), MaskUse::default(), 1 << 27),
            (view(3, 4, 12), MaskUse::default(), 1 << 27),
            (view(2, 3, 1001), MaskUse::default(), 4096),
            (
                view(300, 64, 1),
                MaskUse {
                    statistics: true,
                    elementwise: false,
                    by_row: false,
                },
                1 << 27,
            ),
        ] {
            let mut tuning = coalesced();
            tuning.reduce_invocations = 1024;
            let plan = DispatchPlan::new(v, DType::F32, mask, limits(max), &tuning).unwrap();
            let mut seen = vec![0u8; v.len()];
            for chunk in &plan.chunks {
                let tiles = chunk.tiles as u64;
                let groups = match plan.stats {
                    Layout::Rows1 | Layout::Channels4 | Layout::Channels8 => tiles * u64::from(plan.column_blocks),
                    _ => tiles * v.channels as u64,
                };
                for group in 0..groups as usize {
                    for lane in 0..WORKGROUP as usize {
                        for step in 0..=plan.elems_per_thread {
                            if let Some(a) = plan.coalesced_element(chunk, group, lane, step) {
                                let n = if matches!(plan.stats, Layout::Rows1 | Layout::Generic) {
                                    1
                                } else {
                                    4
                                };
                                for s in &mut seen[a..a + n] {
                                    *s += 1;
                                }
                            }
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{v:?} {:?} max {max}", plan.stats);
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
        let plan = DispatchPlan::new(v, DType::F32, MaskUse::default(), small, &serial()).unwrap();
        assert!(plan.finalize_grid.0 <= 1024 && plan.finalize_grid.1 <= 1024);
        let tiny = PlanLimits {
            max_groups: 8,
            ..limits(128 << 20)
        };
        assert!(matches!(
            DispatchPlan::new(v, DType::F32, MaskUse::default(), tiny, &serial()),
            Err(Error::TooLarge { .. })
        ));
    }
}
