//! The layer's weights: Keras's slots in one buffer, read and written by
//! name or in Keras's order, float16 state, and the inference transform.

use std::sync::atomic::Ordering;

use super::{BatchNorm, StateSlot};
use crate::config::StatePrecision;
use crate::error::{Error, Result};
#[cfg(not(target_arch = "wasm32"))]
use crate::tensor::blocking;
use crate::tensor::{Wait, read_buffer};

impl BatchNorm {
    /// The buffer holding every weight: per [`StateSlot`], in its order,
    /// `channels` float32 values starting at [`BatchNorm::weight_range`],
    /// `4 * state_stride()` bytes after the previous slot. Every slot
    /// starts at a multiple of the device's storage offset alignment
    /// ([`crate::GpuContext::storage_offset_alignment`]), so an application's own
    /// kernels (an optimiser, say) can bind one slot as a storage buffer
    /// at its range; the padding between slots is never read. Call
    /// [`BatchNorm::mark_weights_changed`] after writing.
    pub fn state_buffer(&self) -> &wgpu::Buffer {
        &self.state
    }

    /// Byte range of one weight inside [`BatchNorm::state_buffer`]: its
    /// start is aligned for a storage binding.
    pub fn weight_range(&self, slot: StateSlot) -> std::ops::Range<u64> {
        let start = (slot.index() * self.state_stride() * 4) as u64;
        start..start + (self.channels * 4) as u64
    }

    /// Floats from one state slot to the next in
    /// [`BatchNorm::state_buffer`]: `channels` rounded up to the storage
    /// offset alignment.
    pub fn state_stride(&self) -> usize {
        super::state_stride(&self.ctx, self.channels)
    }

    /// Tells the layer its weights were written from outside: a later
    /// `backward` then refuses to differentiate an earlier forward call.
    pub fn mark_weights_changed(&self) {
        self.weights_replaced();
    }

    /// The weights this layer has, in Keras's `get_weights()` order.
    pub fn weight_slots(&self) -> Vec<StateSlot> {
        StateSlot::ALL.into_iter().filter(|s| s.present(&self.config)).collect()
    }

    /// Reads every weight back, in Keras order, with its name (never
    /// blocks: see [`crate::Tensor::read_f32_async`]).
    pub async fn named_weights_async(&self) -> Result<Vec<(StateSlot, Vec<f32>)>> {
        self.named_weights_waiting(Wait::Await).await
    }

    /// Blocking form of [`BatchNorm::named_weights_async`] (not on the web).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn named_weights(&self) -> Result<Vec<(StateSlot, Vec<f32>)>> {
        blocking(self.named_weights_waiting(Wait::Block))
    }

    async fn named_weights_waiting(&self, wait: Wait) -> Result<Vec<(StateSlot, Vec<f32>)>> {
        let stride = self.state_stride();
        let bytes = read_buffer(&self.ctx, &self.state, 0, 7 * stride as u64 * 4, wait).await?;
        let all: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        Ok(self
            .weight_slots()
            .into_iter()
            .map(|s| (s, all[s.index() * stride..][..self.channels].to_vec()))
            .collect())
    }

    /// The inference transform per channel, `y = x * scale + shift`, for
    /// folding the layer into a preceding convolution or dense layer:
    /// `scale = gamma / sqrt(moving_variance + epsilon)`,
    /// `shift = beta - moving_mean * scale` (computed in float64).
    pub async fn inference_affine_async(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(self.affine_of(&self.named_weights_async().await?))
    }

    /// Blocking form of [`BatchNorm::inference_affine_async`] (not on the web).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn inference_affine(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(self.affine_of(&self.named_weights()?))
    }

    fn affine_of(&self, weights: &[(StateSlot, Vec<f32>)]) -> (Vec<f32>, Vec<f32>) {
        let get = |slot: StateSlot, default: f64| -> Vec<f64> {
            weights
                .iter()
                .find(|(s, _)| *s == slot)
                .map(|(_, v)| v.iter().map(|&x| x as f64).collect())
                .unwrap_or_else(|| vec![default; self.channels])
        };
        let (gamma, beta) = (get(StateSlot::Gamma, 1.0), get(StateSlot::Beta, 0.0));
        let (mean, variance) = (get(StateSlot::MovingMean, 0.0), get(StateSlot::MovingVariance, 1.0));
        let eps = self.config.epsilon as f64;
        let scale: Vec<f64> = (0..self.channels)
            .map(|c| gamma[c] / (variance[c] + eps).sqrt())
            .collect();
        let shift = (0..self.channels)
            .map(|c| (beta[c] - mean[c] * scale[c]) as f32)
            .collect();
        (scale.into_iter().map(|v| v as f32).collect(), shift)
    }

    /// Keras's `get_weights()`: gamma, beta, moving_mean, moving_variance
    /// (then the renorm state), skipping the weights the config leaves out.
    pub async fn get_weights_async(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.named_weights_async().await?.into_iter().map(|(_, v)| v).collect())
    }

    /// Blocking form of [`BatchNorm::get_weights_async`] (not on the web).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn get_weights(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.named_weights()?.into_iter().map(|(_, v)| v).collect())
    }

    /// Keras's `set_weights()`, in the order of [`BatchNorm::get_weights`].
    pub fn set_weights(&self, weights: &[Vec<f32>]) -> Result<()> {
        let slots = self.weight_slots();
        if weights.len() != slots.len() {
            return Err(Error::weights(
                None,
                format!(
                    "expected {} weights ({}), got {}",
                    slots.len(),
                    slots.iter().map(|s| s.keras_name()).collect::<Vec<_>>().join(", "),
                    weights.len()
                ),
            ));
        }
        for (slot, w) in slots.iter().zip(weights) {
            self.check_weight(*slot, w)?;
        }
        for (slot, w) in slots.into_iter().zip(weights) {
            self.write_weight(slot, w);
        }
        Ok(())
    }

    /// Sets one weight by slot.
    pub fn set_weight(&self, slot: StateSlot, values: &[f32]) -> Result<()> {
        self.check_weight(slot, values)?;
        self.write_weight(slot, values);
        Ok(())
    }

    fn check_weight(&self, slot: StateSlot, values: &[f32]) -> Result<()> {
        if !slot.present(&self.config) {
            return Err(Error::weights(
                Some(slot.keras_name()),
                format!(
                    "this layer has no {} (center={}, scale={}, renorm={})",
                    slot.keras_name(),
                    self.config.center,
                    self.config.scale,
                    self.config.renorm
                ),
            ));
        }
        if values.len() != self.channels {
            return Err(Error::weights(
                Some(slot.keras_name()),
                format!(
                    "{} needs {} values, got {}",
                    slot.keras_name(),
                    self.channels,
                    values.len()
                ),
            ));
        }
        Ok(())
    }

    /// A weight as the state stores it (float16-rounded under
    /// `StatePrecision::Float16`).
    pub(super) fn stored(&self, v: f32) -> f32 {
        match self.config.state_precision {
            StatePrecision::Float32 => v,
            StatePrecision::Float16 => half::f16::from_f32(v).to_f32(),
        }
    }

    fn write_weight(&self, slot: StateSlot, values: &[f32]) {
        let offset = self.weight_range(slot).start;
        let values: Vec<f32> = values.iter().map(|&v| self.stored(v)).collect();
        self.ctx
            .queue()
            .write_buffer(&self.state, offset, bytemuck::cast_slice(&values));
        self.weights_replaced();
    }

    /// Marks the weights as replaced: the saved forward no longer matches.
    pub(crate) fn weights_replaced(&self) {
        self.weights_version.fetch_add(1, Ordering::AcqRel);
    }
}
