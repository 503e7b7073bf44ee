//! The recorder: turns a planned call (`plan::CallPlan`) into a compute
//! pass's bind groups and dispatches. Forward, backward, the synchronized
//! phases and the benchmark's timed calls all record through here.
//!
//! Nothing here allocates per call once a loop is warm: the uniform slots
//! of a call are cached by their bytes (immutable, so calls recorded into
//! one encoder never share a slot that changes), bind groups by what they
//! bind, and the scratch buffers grow and stay.

use super::{BatchNorm, SavedForward};
use crate::config::Regularizer;
use crate::context::GpuContext;
use crate::error::Result;
use crate::params::{PARAMS_SLOT, Params};
use crate::plan::{CallPlan, Chunk, Over};
use crate::tensor::{Mask, Tensor};
use crate::variants::{Kernel, Role};

/// Uniform blocks kept per layer: a loop's forward, backward and
/// synchronized phases, with room for a few shapes.
const UNIFORM_CACHE: usize = 16;
/// Bind groups are kept while the calls of the last this many recordings
/// use them: they hold the tensors they bind, which must not outlive a
/// loop's own use of them by much. A synchronized step records four times
/// (two phases a call), so this keeps a few such steps' groups.
const BIND_GROUP_AGE: u64 = 16;

/// Buffers that grow with the input and are reused across calls, and the
/// recorder's caches. Calls run on the queue one after another, each using
/// the scratch only between its own dispatches.
pub(super) struct Scratch {
    pub(super) partials: wgpu::Buffer,
    uniforms: Vec<(Vec<u8>, wgpu::Buffer)>,
    bind_groups: Vec<BindGroupEntry>,
    /// Recordings so far (ages the bind groups).
    recordings: u64,
    /// Synchronized calls: where the first phase writes one partial a
    /// channel and the second reads the merged ones (queue order keeps
    /// them apart), and where the first phase's are read back.
    pub(super) exchanged: Option<ExchangedPartials>,
}

/// A synchronized layer's buffers of one partial a channel, made once.
#[derive(Clone)]
pub(super) struct ExchangedPartials {
    /// Written by the first phase's finalize, then by the merged upload.
    pub(super) partials: wgpu::Buffer,
    /// The first phase's partials, copied out in that phase's submission.
    pub(super) staging: wgpu::Buffer,
}

struct BindGroupEntry {
    key: BindKey,
    group: wgpu::BindGroup,
    used: u64,
}

/// What a bind group binds: its layout's kernel and every buffer range.
#[derive(PartialEq)]
struct BindKey {
    kernel: Kernel,
    ranges: Vec<(wgpu::Buffer, u64, Option<u64>)>,
}

impl Scratch {
    pub(super) fn new(ctx: &GpuContext, channels: usize) -> Self {
        Scratch {
            partials: storage_buffer(ctx, "partials", channels as u64 * 16, wgpu::BufferUsages::empty()),
            uniforms: Vec::new(),
            bind_groups: Vec::new(),
            recordings: 0,
            exchanged: None,
        }
    }

    fn reserve(&mut self, ctx: &GpuContext, partial_bytes: u64) {
        if self.partials.size() < partial_bytes {
            self.partials = storage_buffer(ctx, "partials", partial_bytes, wgpu::BufferUsages::empty());
        }
    }

    /// The uniform buffer holding `slots`, made once per distinct content.
    fn uniform(&mut self, ctx: &GpuContext, slots: Vec<u8>) -> wgpu::Buffer {
        if let Some(i) = self.uniforms.iter().position(|(bytes, _)| *bytes == slots) {
            // most recent last
            let entry = self.uniforms.remove(i);
            let buffer = entry.1.clone();
            self.uniforms.push(entry);
            return buffer;
        }
        if self.uniforms.len() == UNIFORM_CACHE {
            self.uniforms.remove(0);
        }
        let buffer = ctx
            .gpu()
            .create_buffer_init("params", &slots, wgpu::BufferUsages::UNIFORM);
        self.uniforms.push((slots, buffer.clone()));
        buffer
    }
}

/// A storage buffer of `size` bytes (at least 16) of the layer's.
pub(super) fn storage_buffer(ctx: &GpuContext, label: &str, size: u64, extra: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.gpu()
        .create_buffer(label, size.max(16), wgpu::BufferUsages::STORAGE | extra)
}

/// The buffers one call binds, by role: its tensors (bound per chunk) and
/// its per-call buffers; the layer's own (state, affine, grads) come from
/// the layer.
pub(super) struct CallBuffers<'a> {
    pub x: &'a Tensor,
    pub y: Option<&'a Tensor>,
    pub dy: Option<&'a Tensor>,
    pub dx: Option<&'a Tensor>,
    pub mask: Option<&'a wgpu::Buffer>,
    /// The call's own statistics (written forward, read backward).
    pub saved: &'a wgpu::Buffer,
    /// Where backward finalize writes dx's coefficients (or a synchronized
    /// backward's local sums).
    pub coeffs: &'a wgpu::Buffer,
    /// A synchronized call's merged partials instead of the scratch tiles.
    pub partials: Option<&'a wgpu::Buffer>,
}

impl<'a> CallBuffers<'a> {
    /// A forward call's: its input, its output where it normalises, the
    /// mask its reductions read, and where its statistics go.
    pub(super) fn forward(
        layer: &'a BatchNorm,
        x: &'a Tensor,
        y: Option<&'a Tensor>,
        mask: Option<&'a Mask>,
        saved: &'a wgpu::Buffer,
    ) -> Self {
        CallBuffers {
            x,
            y,
            dy: None,
            dx: None,
            mask: mask.map(|m| &m.buffer),
            saved,
            coeffs: &layer.coeffs,
            partials: None,
        }
    }

    /// A backward call's: its forward's input, mask and statistics, dy,
    /// dx where it runs the dx pass, and where the coefficients go.
    pub(super) fn backward(
        saved: &'a SavedForward,
        dy: &'a Tensor,
        dx: Option<&'a Tensor>,
        coeffs: &'a wgpu::Buffer,
    ) -> Self {
        CallBuffers {
            x: &saved.x,
            y: None,
            dy: Some(dy),
            dx,
            mask: saved.mask.as_ref().map(|m| &m.buffer),
            saved: saved.statistics.buffer(),
            coeffs,
            partials: None,
        }
    }

    /// Reading a synchronized call's merged partials (`None`: the tiles).
    pub(super) fn with_partials(self, partials: Option<&'a wgpu::Buffer>) -> Self {
        CallBuffers { partials, ..self }
    }
}

/// A buffer range as a bind group entry's resource.
fn range(buffer: &wgpu::Buffer, offset: u64, size: Option<u64>) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: size.and_then(wgpu::BufferSize::new),
    })
}

impl BatchNorm {
    /// Records every dispatch of `plan` into `pass`, its uniform slots
    /// from `flags` and the input's `shape`.
    pub(super) fn record_plan(
        &self,
        pass: &mut wgpu::ComputePass,
        plan: &CallPlan,
        flags: u32,
        shape: &[usize],
        buffers: &CallBuffers,
    ) -> Result<()> {
        let ctx = &self.ctx;
        let mut scratch = self.lock_scratch();
        scratch.reserve(ctx, (self.channels * plan.cut.total_tiles * 16) as u64);
        scratch.recordings += 1;
        let now = scratch.recordings;
        scratch.bind_groups.retain(|e| now - e.used < BIND_GROUP_AGE);
        let uniform = scratch.uniform(ctx, self.uniform_slots(plan, flags, shape));
        let partials = buffers.partials.cloned().unwrap_or_else(|| scratch.partials.clone());
        for dispatch in &plan.dispatches {
            let kernel = dispatch.key.kernel;
            pass.set_pipeline(&ctx.inner.kernels.pipeline(ctx.gpu(), dispatch.key)?);
            let chunks: &[Chunk] = match dispatch.over {
                Over::Chunks => &plan.cut.chunks,
                Over::Channels => &plan.cut.chunks[..1],
            };
            for (i, chunk) in chunks.iter().enumerate() {
                let mut ranges = vec![(uniform.clone(), 0, Some(kernel.uniform_size()))];
                for &(role, _) in kernel.bindings() {
                    ranges.push(self.role_range(role, chunk, dispatch.over, buffers, &partials));
                }
                if let Some(binding) = kernel.uniform_params_binding() {
                    // the per-channel parameters again, as a uniform view
                    // (a placeholder where the kernel reads them from storage)
                    let kernels = &ctx.inner.kernels;
                    let buffer = match (dispatch.key.uniform_params, kernel) {
                        (false, _) => &kernels.uniform_view_placeholder,
                        (true, Kernel::Normalize) => &self.affine,
                        (true, _) => buffers.coeffs,
                    };
                    debug_assert_eq!(binding as usize, ranges.len());
                    ranges.push((buffer.clone(), 0, Some(kernels.uniform_view)));
                }
                let group = scratch.bind_group(ctx, kernel, ranges, now)?;
                let slot = match dispatch.over {
                    Over::Chunks => i as u64 * PARAMS_SLOT,
                    Over::Channels => 0,
                };
                pass.set_bind_group(0, &group, &[slot as u32]);
                let (gx, gy) = plan.grid(dispatch, chunk);
                pass.dispatch_workgroups(gx, gy, 1);
            }
        }
        Ok(())
    }

    /// The buffer range `role` binds for one dispatch over `chunk`.
    fn role_range(
        &self,
        role: Role,
        chunk: &Chunk,
        over: Over,
        buffers: &CallBuffers,
        partials: &wgpu::Buffer,
    ) -> (wgpu::Buffer, u64, Option<u64>) {
        let whole = |b: &wgpu::Buffer| (b.clone(), 0, None);
        let tensor = |t: Option<&Tensor>| {
            let t = t.expect("the plan binds a tensor the call has");
            match over {
                Over::Chunks => (
                    t.buffer().clone(),
                    t.offset() + chunk.bind_offset,
                    Some(chunk.bind_size),
                ),
                Over::Channels => (t.buffer().clone(), t.offset(), Some(t.byte_len())),
            }
        };
        match role {
            Role::X => tensor(Some(buffers.x)),
            Role::Y => tensor(buffers.y),
            Role::Dy => tensor(buffers.dy),
            Role::Dx => tensor(buffers.dx),
            Role::Mask => whole(buffers.mask.unwrap_or(&self.ctx.gpu().placeholder)),
            Role::Partials => whole(partials),
            Role::State => whole(&self.state),
            Role::Affine => whole(&self.affine),
            Role::Saved => whole(buffers.saved),
            Role::Coeffs => whole(buffers.coeffs),
            Role::Grads => whole(&self.grads),
            Role::Dgamma | Role::Dbeta | Role::Velocity => unreachable!("the optimiser binds its own"),
        }
    }

    /// One uniform slot per chunk of the plan (`PARAMS_SLOT` bytes apart).
    fn uniform_slots(&self, plan: &CallPlan, flags: u32, shape: &[usize]) -> Vec<u8> {
        let cfg = &self.config;
        let clip = cfg.renorm_clipping;
        let cut = &plan.cut;
        let view = cut.view;
        let regularizer = |r: Option<Regularizer>| r.unwrap_or_default();
        let mut slots = vec![0u8; cut.chunks.len() * PARAMS_SLOT as usize];
        for (i, chunk) in cut.chunks.iter().enumerate() {
            let params = Params {
                channels: view.channels as u32,
                inner: view.inner as u32,
                chunk_start: chunk.start as u32,
                x_base: chunk.base,
                y_base: chunk.base,
                last_dim: *shape.last().unwrap_or(&1) as u32,
                lane_width: cut.lane_width,
                elems_per_thread: cut.elems_per_thread as u32,
                tiles: chunk.tiles as u32,
                tile_offset: chunk.tile_offset as u32,
                total_tiles: cut.total_tiles as u32,
                stats_groups_x: chunk.stats_grid.0,
                norm_groups_x: chunk.normalize_grid.0,
                finalize_groups_x: cut.finalize_grid.0,
                chunk_elems: chunk.elems as u32,
                flags,
                momentum: cfg.momentum,
                epsilon: cfg.epsilon,
                renorm_momentum: cfg.renorm_momentum,
                rmin: clip.rmin.unwrap_or(0.0),
                rmax: clip.rmax.unwrap_or(0.0),
                dmax: clip.dmax.unwrap_or(0.0),
                gamma_l1: regularizer(cfg.gamma_regularizer).l1,
                gamma_l2: regularizer(cfg.gamma_regularizer).l2,
                beta_l1: regularizer(cfg.beta_regularizer).l1,
                beta_l2: regularizer(cfg.beta_regularizer).l2,
                column_blocks: cut.column_blocks,
                elementwise_steps: chunk.elementwise_steps,
                state_stride: self.state_stride() as u32,
                zero: 0,
                _pad: [0; 2],
            };
            slots[i * PARAMS_SLOT as usize..][..std::mem::size_of::<Params>()]
                .copy_from_slice(bytemuck::bytes_of(&params));
        }
        slots
    }
}

impl Scratch {
    /// The bind group of `kernel` over `ranges`, made once while calls use it.
    fn bind_group(
        &mut self,
        ctx: &GpuContext,
        kernel: Kernel,
        ranges: Vec<(wgpu::Buffer, u64, Option<u64>)>,
        now: u64,
    ) -> Result<wgpu::BindGroup> {
        let key = BindKey { kernel, ranges };
        if let Some(entry) = self.bind_groups.iter_mut().find(|e| e.key == key) {
            entry.used = now;
            return Ok(entry.group.clone());
        }
        let entries: Vec<_> = key
            .ranges
            .iter()
            .enumerate()
            .map(|(i, (buffer, offset, size))| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: range(buffer, *offset, *size),
            })
            .collect();
        let group = ctx.gpu().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry_point()),
            layout: ctx.inner.kernels.bind_group_layout(kernel)?,
            entries: &entries,
        });
        self.bind_groups.push(BindGroupEntry {
            key,
            group: group.clone(),
            used: now,
        });
        Ok(group)
    }
}
