//! How a round is timed: GPU timestamp queries where the device has
//! them, else the host clock up to the queue's work-done callback.

use super::Op;
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::tensor::Wait;

/// The host clock: the browser's `performance.now()` on the web.
#[cfg(not(target_arch = "wasm32"))]
use std::time::Instant;
#[cfg(target_arch = "wasm32")]
use web_time::Instant;

/// Waits, without blocking, until the GPU has finished everything
/// submitted so far; the host clock's time when the queue said so (taken
/// in the queue's callback). Natively a helper thread drives the device
/// (as the library's async reads do); in a browser the browser does.
pub(super) async fn work_done(ctx: &GpuContext) -> Result<Instant> {
    let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
    ctx.queue().on_submitted_work_done(move || {
        sender.send(Instant::now()).ok();
    });
    #[cfg(not(target_arch = "wasm32"))]
    {
        let device = ctx.device().clone();
        std::thread::spawn(move || device.poll(wgpu::PollType::wait_indefinitely()));
    }
    receiver
        .receive()
        .await
        .ok_or_else(|| Error::readback("the queue's work-done callback never ran"))
}

/// Timestamp pairs a round can hold: one per operation.
const SLOTS: u32 = Op::ALL.len() as u32;

/// How a run is timed: GPU timestamp queries around the operation's
/// commands where the device has them (no submission or wait overhead;
/// one readback per round), else the host clock from submission to the
/// queue's work-done callback.
pub(super) enum Clock {
    Gpu {
        /// A pair of timestamps per slot.
        queries: wgpu::QuerySet,
        /// Where they are resolved to (16 bytes a slot).
        resolved: wgpu::Buffer,
        /// Nanoseconds per timestamp tick.
        period: f64,
    },
    Host,
}

impl Clock {
    pub(super) fn new(ctx: &GpuContext) -> Self {
        let device = ctx.device();
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Clock::Host;
        }
        Clock::Gpu {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * SLOTS,
            }),
            resolved: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("resolved timestamps"),
                size: 16 * u64::from(SLOTS),
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            period: ctx.queue().get_timestamp_period() as f64,
        }
    }

    /// The JSON's `timing` value.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Clock::Gpu { .. } => "gpu-timestamps",
            Clock::Host => "host-clock",
        }
    }

    /// Submits `record`'s commands alone, between slot `slot`'s two
    /// timestamps, and waits (without blocking) until they have run. The
    /// host clock's milliseconds from the submission to the queue's
    /// callback (natively that includes starting the thread that polls the
    /// device); NaN for the GPU clock, whose figures [`Clock::read`] gives.
    pub(super) async fn submit(
        &self,
        ctx: &GpuContext,
        slot: u32,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<f64> {
        let start = ctx.scoped("timing a benchmark run", || {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            self.mark(&mut encoder, slot, true);
            record(&mut encoder)?;
            self.mark(&mut encoder, slot, false);
            let commands = encoder.finish();
            let start = Instant::now();
            ctx.queue().submit([commands]);
            Ok(start)
        })?;
        let end = work_done(ctx).await?;
        Ok(match self {
            Clock::Host => end.duration_since(start).as_secs_f64() * 1e3,
            Clock::Gpu { .. } => f64::NAN,
        })
    }

    /// The milliseconds of the round just submitted, slot by slot: `host`
    /// itself for the host clock, the timestamps of as many slots read back
    /// (without blocking) for the GPU clock.
    pub(super) async fn read(&self, ctx: &GpuContext, host: Vec<f64>) -> Result<Vec<f64>> {
        let Clock::Gpu {
            queries,
            resolved,
            period,
        } = self
        else {
            return Ok(host);
        };
        let n = host.len() as u32;
        ctx.scoped("resolving benchmark timestamps", || {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            encoder.resolve_query_set(queries, 0..2 * n, resolved, 0);
            ctx.queue().submit([encoder.finish()]);
            Ok(())
        })?;
        let bytes = crate::tensor::read_buffer(ctx, resolved, 0, 16 * u64::from(n), Wait::Await).await?;
        let ticks: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        Ok(ticks
            .chunks_exact(2)
            .map(|pair| pair[1].saturating_sub(pair[0]) as f64 * period / 1e6)
            .collect())
    }

    /// An empty compute pass that writes slot `slot`'s first timestamp
    /// (`begin`) or its second, bracketing the commands recorded between.
    fn mark(&self, encoder: &mut wgpu::CommandEncoder, slot: u32, begin: bool) {
        if let Clock::Gpu { queries, .. } = self {
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench timestamp"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: queries,
                    beginning_of_pass_write_index: begin.then_some(2 * slot),
                    end_of_pass_write_index: (!begin).then_some(2 * slot + 1),
                }),
            });
        }
    }
}
