//! A synchronized layer's calls (Keras's `synchronized=True`): each runs in
//! two submissions around one exchange (`crate::sync`). The first reduces
//! this rank's values to one partial a channel on the GPU (the finalize
//! kernels under `FLAG_MERGE_ONLY`) and copies it out to be read back, 16
//! bytes a channel; the ranks' partials are merged on the host in float64,
//! in the fixed order of the exchange's scheme; the second
//! submission uploads the merged partial as the only tile of each channel
//! and runs the usual finalize and elementwise kernels.

use std::sync::Arc;

use super::recorder::{CallBuffers, ExchangedPartials, storage_buffer};
use super::{BackwardArgs, BatchNorm, Call, ForwardArgs, SavedForward, SavedStatistics};
use crate::dtype::DType;
use crate::error::{Error, ExchangeFailure, Result};
use crate::params::FLAG_MERGE_ONLY;
use crate::plan::Phase;
use crate::reference::{ChannelMoments, gather_moments};
use crate::sync::{
    CallHeader, Exchange, KIND_BACKWARD, KIND_FAILED, fingerprint, forward_kind, gather_checked, gather_sums,
};
use crate::tensor::{Mask, Tensor};
#[cfg(not(target_arch = "wasm32"))]
use crate::tensor::{Wait, blocking, read_staging};

impl BatchNorm {
    /// Makes the layer synchronized over `exchange` (Keras's
    /// `synchronized=True`; sets [`crate::BatchNormConfig::synchronized`]).
    ///
    /// Every training forward then uses the statistics of the global batch,
    /// the union of every rank's slice: each rank reduces its slice to
    /// per-channel moments (count, mean, M2), and the ranks merge them with
    /// Chan's formula in a fixed order ([`crate::sync::Scheme`]), so every
    /// rank gets bitwise the same statistics and moving statistics. Every backward adds the
    /// ranks' per-channel sums (dy, dy * (x - mean), masked-in x - mean) in
    /// the same order, so dx uses the global count and dgamma / dbeta are the
    /// global batch's sums, the same on every rank (PyTorch's SyncBatchNorm
    /// leaves those to its data-parallel wrapper). Each call moves O(channels)
    /// bytes a rank, whatever the batch and the rank count (but under
    /// [`crate::sync::Scheme::AllGather`]). Inference forwards exchange
    /// nothing; every backward exchanges its sums (dgamma and dbeta are the
    /// global batch's).
    ///
    /// A rank's slice may be empty (a dimension of 0) or fully masked out;
    /// ranks may hold different batch sizes. Every rank must make the same
    /// calls in the same order with the same channels, dtype, config and
    /// mask use: a mismatch is an [`Error::Exchange`] on every rank, and a
    /// rank whose call fails before the exchange (a bad shape, say) tells
    /// the others, which fail at once. Messages name the call's kind, its
    /// sequence number on the layer, the channels and the config, not the
    /// layer itself: two layers alike (same config and channels) sharing
    /// an exchange must be called in the same order on every rank, or
    /// their moments merge with each other's. A rank that stops calling at
    /// all fails the others at the exchange's timeout
    /// ([`crate::LocalExchange`]); under MPI the others wait until `mpiexec`
    /// ends the job (when a rank exits, or at `MPIEXEC_TIMEOUT`). A
    /// synchronized layer's calls run one at a
    /// time and cannot be recorded into an application's encoder
    /// (`record_forward` in training and `record_backward` refuse): they
    /// wait for the exchange between their two submissions.
    pub fn set_exchange(&mut self, exchange: Arc<dyn Exchange>) {
        self.config.synchronized = true;
        self.exchange = Some(exchange);
    }

    /// The exchange of a synchronized layer that has one.
    pub fn exchange(&self) -> Option<&dyn Exchange> {
        self.exchange.as_deref()
    }

    fn require_exchange(&self) -> Result<&dyn Exchange> {
        self.exchange.as_deref().ok_or_else(|| {
            Error::exchange(
                ExchangeFailure::NoExchange,
                "the layer is synchronized (synchronized: true) but has no exchange: give it one with \
                 BatchNorm::set_exchange (a LocalExchange across the devices of one process, an MpiExchange \
                 across processes, or your own)",
            )
        })
    }

    /// The header of this layer's next synchronized call.
    fn next_header(&self, sequence: &mut u64, kind: u32, dtype: DType) -> CallHeader {
        let header = CallHeader {
            kind,
            sequence: *sequence,
            channels: self.channels as u32,
            fingerprint: fingerprint(&format!("gpu {dtype} {:?}", self.config)),
        };
        *sequence += 1;
        header
    }

    pub(super) fn forward_synchronized(&self, args: ForwardArgs, statistics: SavedStatistics) -> Result<SavedForward> {
        let ForwardArgs { x, training, mask, y } = args;
        if !self.batch_statistics(training) {
            // the moving statistics alone: nothing to exchange
            let call = self.plan_forward(args, true, Phase::Whole)?;
            return self.submit_global_forward(&call, x, mask, y, statistics, None);
        }
        let exchange = self.require_exchange()?;
        let mut sequence = self.synchronized_calls.lock().unwrap_or_else(|e| e.into_inner());
        let kind = forward_kind(mask.is_some());
        let header = self.next_header(&mut sequence, kind, x.dtype());
        // an error return or a panic before the gather tells the others
        let guard = FailUntilGathered::new(exchange, header);
        let local_call = self.plan_forward(args, true, Phase::Reduce)?;
        let local = self.local_moments(&local_call, x, mask)?;
        guard.gathering();
        let merged: Vec<[f32; 4]> = gather_moments(exchange, header, &local)?
            .into_iter()
            .map(moments_to_partial)
            .collect();
        let call = self.plan_forward(args, true, Phase::FromMerged)?;
        self.submit_global_forward(&call, x, mask, y, statistics, Some(&merged))
    }

    /// This rank's moments per channel: the statistics kernel, then the
    /// finalize kernel merging each channel's tiles into one partial, read
    /// back (16 bytes a channel).
    fn local_moments(&self, call: &Call, x: &Tensor, mask: Option<&Mask>) -> Result<Vec<ChannelMoments>> {
        if call.empty {
            return Ok(vec![ChannelMoments::default(); self.channels]);
        }
        let exchanged = self.exchanged_partials();
        let buffers = CallBuffers::forward(self, x, None, mask.filter(|_| call.masked), &exchanged.partials);
        let what = "a synchronized training forward (local moments)";
        let partials = self.local_partials(what, call, x.shape(), &buffers, &exchanged)?;
        Ok(partials.into_iter().map(partial_to_moments).collect())
    }

    /// The second submission of a forward call: finalize over `merged` (one
    /// partial a channel, the global batch's) or, without it, the moving
    /// statistics, then normalise.
    fn submit_global_forward(
        &self,
        call: &Call,
        x: &Tensor,
        mask: Option<&Mask>,
        y: &Tensor,
        statistics: SavedStatistics,
        merged: Option<&[[f32; 4]]>,
    ) -> Result<SavedForward> {
        self.ctx.scoped("a synchronized forward", || {
            let uploaded = merged.map(|m| self.upload_partials(m));
            let mut encoder = self.encoder("synchronized forward");
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                let buffers =
                    CallBuffers::forward(self, x, Some(y), None, statistics.buffer()).with_partials(uploaded.as_ref());
                self.record_plan(&mut pass, &call.plan, call.flags, x.shape(), &buffers)?;
            }
            self.ctx.queue().submit([encoder.finish()]);
            Ok(self.saved_forward(call, x, mask, statistics, true))
        })
    }

    pub(super) fn backward_synchronized(&self, args: BackwardArgs) -> Result<()> {
        let BackwardArgs { saved, dy, grads, .. } = args;
        let exchange = self.require_exchange()?;
        let mut sequence = self.synchronized_calls.lock().unwrap_or_else(|e| e.into_inner());
        let header = self.next_header(&mut sequence, KIND_BACKWARD, saved.x.dtype());
        let guard = FailUntilGathered::new(exchange, header);
        if !saved.synchronized {
            return Err(Error::exchange(
                ExchangeFailure::Unsupported,
                "this forward call ran before the layer was synchronized: its backward cannot be",
            ));
        }
        let local_call = self.plan_backward(args, true, Phase::Reduce)?;
        let local = self.local_sums(&local_call, saved, dy)?;
        guard.gathering();
        let payload: Vec<f64> = local
            .iter()
            .flat_map(|s| s[..3].iter().map(|&v| f64::from(v)))
            .collect();
        let global: Vec<[f32; 4]> = gather_sums(exchange, header, &payload)?
            .chunks_exact(3)
            .map(|s| [s[0] as f32, s[1] as f32, s[2] as f32, 0.0])
            .collect();
        let call = self.plan_backward(args, true, Phase::FromMerged)?;
        self.ctx.scoped("a synchronized backward", || {
            let uploaded = self.upload_partials(&global);
            let mut encoder = self.encoder("synchronized backward");
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                let buffers =
                    CallBuffers::backward(saved, dy, Some(&grads.dx), &self.coeffs).with_partials(Some(&uploaded));
                self.record_plan(&mut pass, &call.plan, call.flags, saved.x.shape(), &buffers)?;
            }
            self.copy_parameter_gradients(&mut encoder, grads);
            self.ctx.queue().submit([encoder.finish()]);
            Ok(())
        })
    }

    /// This rank's backward sums per channel (sum dy, sum dy * (x - mean),
    /// masked-in sum of x - mean, 0), read back.
    fn local_sums(&self, call: &Call, saved: &SavedForward, dy: &Tensor) -> Result<Vec<[f32; 4]>> {
        if call.empty {
            return Ok(vec![[0.0; 4]; self.channels]);
        }
        let exchanged = self.exchanged_partials();
        let buffers = CallBuffers::backward(saved, dy, None, &exchanged.partials);
        let what = "a synchronized backward (local sums)";
        self.local_partials(what, call, saved.x.shape(), &buffers, &exchanged)
    }

    /// The first phase of a synchronized call: `call` under
    /// `FLAG_MERGE_ONLY` writes one partial a channel, copied out in the
    /// same submission and read back.
    fn local_partials(
        &self,
        what: &str,
        call: &Call,
        shape: &[usize],
        buffers: &CallBuffers,
        exchanged: &ExchangedPartials,
    ) -> Result<Vec<[f32; 4]>> {
        let size = self.channels as u64 * 16;
        self.ctx.scoped(what, || {
            let mut encoder = self.encoder(what);
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                self.record_plan(&mut pass, &call.plan, call.flags | FLAG_MERGE_ONLY, shape, buffers)?;
            }
            encoder.copy_buffer_to_buffer(&exchanged.partials, 0, &exchanged.staging, 0, size);
            self.ctx.queue().submit([encoder.finish()]);
            Ok(())
        })?;
        self.read_partials(&exchanged.staging)
    }

    /// The layer's buffers of one partial a channel (made on its first
    /// synchronized call).
    fn exchanged_partials(&self) -> ExchangedPartials {
        let mut scratch = self.lock_scratch();
        scratch
            .exchanged
            .get_or_insert_with(|| {
                let size = self.channels as u64 * 16;
                let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
                ExchangedPartials {
                    partials: storage_buffer(&self.ctx, "synchronized partials", size, usage),
                    staging: self.ctx.gpu().create_buffer(
                        "synchronized partials readback",
                        size,
                        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    ),
                }
            })
            .clone()
    }

    /// This rank's partials, read back: a synchronized call waits for them
    /// between its two submissions, which a browser cannot (nothing may
    /// block there, and a `LocalExchange` needs threads): on the web such a
    /// call is an [`Error::Exchange`].
    fn read_partials(&self, buffer: &wgpu::Buffer) -> Result<Vec<[f32; 4]>> {
        #[cfg(target_arch = "wasm32")]
        {
            let _ = buffer;
            Err(Error::exchange(
                ExchangeFailure::Unsupported,
                "a synchronized layer waits for its exchange between two submissions, which the web cannot",
            ))
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let bytes = blocking(read_staging(&self.ctx, buffer, self.channels as u64 * 16, Wait::Block))?;
            Ok(bytes
                .chunks_exact(16)
                .map(|q| std::array::from_fn(|i| f32::from_le_bytes(q[4 * i..4 * i + 4].try_into().unwrap())))
                .collect())
        }
    }

    /// The merged partials as the second phase reads them, written on the
    /// queue (after the first phase, before the submission that reads them).
    fn upload_partials(&self, partials: &[[f32; 4]]) -> wgpu::Buffer {
        let buffer = self.exchanged_partials().partials;
        self.ctx
            .queue()
            .write_buffer(&buffer, 0, bytemuck::cast_slice(partials));
        buffer
    }
}

/// Made with a call's header, until the call reaches its gather: if the
/// call returns an error or panics first (a wgpu validation error, say),
/// its drop sends the failure message, so the other ranks fail at once
/// instead of waiting for this one.
struct FailUntilGathered<'a> {
    exchange: &'a dyn Exchange,
    header: CallHeader,
}

impl<'a> FailUntilGathered<'a> {
    fn new(exchange: &'a dyn Exchange, header: CallHeader) -> Self {
        FailUntilGathered { exchange, header }
    }

    /// The call goes on to its gather: nothing to send.
    fn gathering(self) {
        std::mem::forget(self);
    }
}

impl Drop for FailUntilGathered<'_> {
    fn drop(&mut self) {
        let failed = CallHeader {
            kind: KIND_FAILED,
            ..self.header
        };
        let _ = gather_checked(self.exchange, failed, &[]);
    }
}

/// Mirror of `shift_scale` in `shaders/params.wgsl`: the power of two a
/// partial's M2 is scaled by, so that the M2 of values near float32's
/// largest stays finite.
fn shift_scale(shift: f32) -> f32 {
    let e = (shift.to_bits() >> 23) & 0xff;
    if e < 147 {
        return 1.0;
    }
    f32::from_bits((254 - e.min(253)) << 23)
}

/// A partial of the statistics kernels (count, shift, mean - shift, M2
/// scaled by `shift_scale(shift)^2`) as float64 moments.
fn partial_to_moments([count, shift, delta, scaled_m2]: [f32; 4]) -> ChannelMoments {
    if count == 0.0 {
        return ChannelMoments::default();
    }
    let k = f64::from(shift_scale(shift));
    ChannelMoments {
        count: f64::from(count),
        mean: f64::from(shift) + f64::from(delta),
        m2: f64::from(scaled_m2) / (k * k),
    }
}

/// Merged float64 moments as the one partial of a channel: the shift is
/// the mean rounded to float32, the rest of the mean its correction. M2
/// is scaled by the shift's `shift_scale`; where that overflows float32
/// (values far larger than their mean, such as +-1e19 around 0), the
/// shift moves one standard deviation from the mean, into the values'
/// own magnitude, whose scale keeps it finite.
fn moments_to_partial(m: ChannelMoments) -> [f32; 4] {
    if m.count == 0.0 {
        return [0.0; 4];
    }
    let partial = |shift: f32| {
        // an infinite or NaN mean stays one (the finalize kernel's merge
        // adds the corrections of such partials)
        let delta = if m.mean.is_finite() {
            (m.mean - f64::from(shift)) as f32
        } else {
            0.0
        };
        let k = f64::from(shift_scale(shift));
        [m.count as f32, shift, delta, (m.m2 * k * k) as f32]
    };
    let at_mean = partial(m.mean as f32);
    if at_mean[3].is_finite() || !m.m2.is_finite() || !m.mean.is_finite() {
        return at_mean;
    }
    let spread = (m.mean + (m.m2 / m.count).sqrt()) as f32;
    if spread.is_finite() { partial(spread) } else { at_mean }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_and_moments_convert_both_ways() {
        // the last: +-1e19 around 0 (M2 past float32 at a shift of 0)
        for (mean, m2) in [
            (1.5f64, 3.25f64),
            (-3.0e38, 1.0e70),
            (1e-30, 1e-20),
            (7.0, 0.0),
            (0.0, 5.0e38),
        ] {
            let p = moments_to_partial(ChannelMoments { count: 5.0, mean, m2 });
            assert!(p[3].is_finite(), "{mean} {m2}: {p:?}");
            let back = partial_to_moments(p);
            assert_eq!(back.count, 5.0);
            assert!((back.mean - mean).abs() <= mean.abs() * 1e-12, "{mean}: {back:?}");
            assert!((back.m2 - m2).abs() <= m2.abs() * 1e-6, "{m2}: {back:?}");
        }
        let inf = moments_to_partial(ChannelMoments {
            count: 2.0,
            mean: f64::INFINITY,
            m2: f64::NAN,
        });
        assert_eq!(inf[1], f32::INFINITY);
        assert_eq!(inf[2], 0.0);
        assert_eq!(moments_to_partial(ChannelMoments::default()), [0.0; 4]);
    }

    #[test]
    fn shift_scale_matches_the_shader_at_its_edges() {
        assert_eq!(shift_scale(1.0), 1.0);
        // biased exponent 147 and up scales down
        let at = f32::from_bits(147 << 23);
        assert_eq!(shift_scale(at), f32::from_bits((254 - 147) << 23));
        assert_eq!(shift_scale(f32::MAX), f32::from_bits(1 << 23));
        assert_eq!(shift_scale(-f32::MAX), f32::from_bits(1 << 23));
    }
}
