//! Dispatch plans: how one input is cut into chunks that fit a storage
//! binding, and into statistics tiles.

use crate::config::ChannelView;
use crate::error::{Error, Result};
use crate::kernels::{NORMALIZE_PER_THREAD, WORKGROUP, grid};
use crate::tensor::{DType, padded_bytes};

/// Values of one channel an invocation of the statistics kernel reduces at
/// most by default: enough to amortise the workgroup reduction (see
/// LAVAPIPE.md), few enough to keep real GPUs busy.
const STATS_ELEMS_PER_THREAD: usize = 64;
/// Hard cap on any per-invocation loop (llvmpipe stops loops at 65535).
const MAX_LOOP: usize = 4096;
/// The finalize kernel loops over a channel's tiles.
const MAX_TILES: usize = 65535;

/// Whole outer rows of the canonical view, bound at one aligned offset.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Chunk {
    pub row_begin: usize,
    pub rows: usize,
    /// Byte offset of the binding (a multiple of the storage alignment).
    pub bind_offset: u64,
    /// Bytes bound.
    pub bind_size: u64,
    /// Elements between the binding's start and the chunk's first element.
    pub base: u32,
    pub elems: usize,
    pub tiles: usize,
    pub tile_offset: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DispatchPlan {
    pub view: ChannelView,
    pub dtype: DType,
    pub chunks: Vec<Chunk>,
    pub elems_per_thread: usize,
    pub total_tiles: usize,
}

impl DispatchPlan {
    pub(crate) fn new(view: ChannelView, dtype: DType, max_binding: u64, alignment: u64) -> Result<Self> {
        let len = view.len();
        if len > u32::MAX as usize {
            return Err(Error::TooLarge(format!(
                "{len} elements exceed the 2^32 a kernel can index"
            )));
        }
        // indices inside a binding are u32
        let max_binding = max_binding.min(1 << 31);
        let size = dtype.size() as u64;
        let slab = (view.channels * view.inner) as u64;
        let rows_per_chunk = if padded_bytes(len, dtype) <= max_binding {
            view.outer
        } else {
            let room = max_binding.saturating_sub(alignment + 4);
            let mut rows = (room / (slab * size)) as usize;
            // float16 chunks must start on a whole u32 word
            if dtype == DType::F16 && slab % 2 == 1 {
                rows -= rows % 2;
            }
            if rows == 0 {
                return Err(Error::TooLarge(format!(
                    "one outer row of {} values ({} bytes) does not fit a storage binding of {max_binding} bytes",
                    slab,
                    slab * size
                )));
            }
            rows
        };

        let mut chunks = Vec::new();
        let mut row_begin = 0;
        while row_begin < view.outer {
            let rows = rows_per_chunk.min(view.outer - row_begin);
            let start = row_begin as u64 * slab * size;
            let end = ((row_begin + rows) as u64 * slab * size).div_ceil(4) * 4;
            let bind_offset = start / alignment * alignment;
            chunks.push(Chunk {
                row_begin,
                rows,
                bind_offset,
                bind_size: end - bind_offset,
                base: ((start - bind_offset) / size) as u32,
                elems: rows * slab as usize,
                tiles: 0,
                tile_offset: 0,
            });
            row_begin += rows;
        }

        let longest_run = chunks.iter().map(|c| c.rows * view.inner).max().unwrap_or(1);
        let mut elems_per_thread = longest_run
            .div_ceil(WORKGROUP as usize)
            .clamp(1, STATS_ELEMS_PER_THREAD);
        let tiles_for = |e: usize| -> usize {
            chunks
                .iter()
                .map(|c| (c.rows * view.inner).div_ceil(WORKGROUP as usize * e))
                .sum()
        };
        while tiles_for(elems_per_thread) > MAX_TILES && elems_per_thread < MAX_LOOP {
            elems_per_thread *= 2;
        }
        let mut tile_offset = 0;
        for c in &mut chunks {
            c.tiles = (c.rows * view.inner).div_ceil(WORKGROUP as usize * elems_per_thread);
            c.tile_offset = tile_offset;
            tile_offset += c.tiles;
        }
        if tile_offset > MAX_TILES {
            return Err(Error::TooLarge(format!(
                "{} values per channel need more than {MAX_TILES} statistics tiles",
                view.per_channel()
            )));
        }
        Ok(DispatchPlan {
            view,
            dtype,
            chunks,
            elems_per_thread,
            total_tiles: tile_offset,
        })
    }

    /// Workgroups of the statistics kernel for one chunk.
    pub(crate) fn stats_groups(&self, chunk: &Chunk) -> u32 {
        (chunk.tiles * self.view.channels) as u32
    }

    /// Workgroups of the normalise kernel for one chunk.
    pub(crate) fn normalize_groups(&self, chunk: &Chunk) -> u32 {
        let units = match self.dtype {
            DType::F32 => chunk.elems,
            DType::F16 => chunk.elems.div_ceil(2),
        };
        (units.div_ceil(NORMALIZE_PER_THREAD as usize)).div_ceil(WORKGROUP as usize) as u32
    }

    pub(crate) fn stats_grid(&self, chunk: &Chunk) -> (u32, u32) {
        grid(self.stats_groups(chunk))
    }

    pub(crate) fn normalize_grid(&self, chunk: &Chunk) -> (u32, u32) {
        grid(self.normalize_groups(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chunk_when_it_fits() {
        let view = ChannelView { outer: 32, channels: 64, inner: 3136 };
        let plan = DispatchPlan::new(view, DType::F32, 1 << 27, 256).unwrap();
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.chunks[0].bind_size, view.len() as u64 * 4);
    }

    #[test]
    fn chunks_cover_every_row_once_and_fit() {
        for (dtype, inner) in [(DType::F32, 7), (DType::F16, 7), (DType::F16, 8), (DType::F32, 1)] {
            let view = ChannelView { outer: 1001, channels: 3, inner };
            let max = 4096;
            let plan = DispatchPlan::new(view, dtype, max, 256).unwrap();
            assert!(plan.chunks.len() > 1);
            let mut next = 0;
            for c in &plan.chunks {
                assert_eq!(c.row_begin, next);
                assert!(c.bind_size <= max, "{c:?}");
                assert_eq!(c.bind_offset % 256, 0);
                assert_eq!(c.bind_size % 4, 0);
                if dtype == DType::F16 {
                    assert_eq!(c.base % 2, 0);
                }
                next += c.rows;
            }
            assert_eq!(next, view.outer);
        }
    }

    #[test]
    fn a_row_larger_than_a_binding_is_an_error() {
        let view = ChannelView { outer: 2, channels: 4096, inner: 1 };
        assert!(matches!(
            DispatchPlan::new(view, DType::F32, 4096, 256),
            Err(Error::TooLarge(_))
        ));
    }
}
