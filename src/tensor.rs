//! Tensors on the GPU (a buffer, a shape and a dtype), masks, and the
//! upload and readback helpers.

use half::f16;

use crate::context::GpuContext;
pub use crate::dtype::DType;
use crate::dtype::padded_bytes;
use crate::error::{Error, Result};

/// The elements of a tensor of `shape` (rank 1 to 8), with every product
/// checked: a shape whose size or bytes overflow is an error, never a
/// wrapped number. A shape may have an empty dimension (a synchronized
/// rank's empty slice of a batch); the layers refuse such inputs otherwise.
pub(crate) fn element_count(shape: &[usize]) -> Result<usize> {
    if shape.is_empty() || shape.len() > 8 {
        return Err(Error::shape(
            "shape",
            format!("rank {} is not supported (1 to 8)", shape.len()),
        ));
    }
    checked_product(shape)
}

/// The flags of a mask of `shape`: the input's rank less one, so 0 (one
/// flag for a whole rank-1 input, as Keras takes it) to 7.
pub(crate) fn mask_flag_count(shape: &[usize]) -> Result<usize> {
    if shape.len() > 7 {
        return Err(Error::shape(
            "mask",
            format!(
                "a mask of rank {} is not supported (0 to 7: an input's rank less one)",
                shape.len()
            ),
        ));
    }
    checked_product(shape)
}

/// The product of `shape`, checked: 4 bytes an element must fit in u64 and
/// usize too.
fn checked_product(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or_else(|| {
            Error::too_large(
                "addressable elements",
                format!("shape {shape:?} holds more elements than can be addressed"),
            )
        })
}

fn check_shape(shape: &[usize], len: usize) -> Result<()> {
    let n = element_count(shape)?;
    if n != len {
        return Err(Error::shape(
            "shape",
            format!("shape {shape:?} does not hold {len} values"),
        ));
    }
    Ok(())
}

fn check_size(ctx: &GpuContext, bytes: u64) -> Result<()> {
    let max = ctx.device().limits().max_buffer_size;
    if bytes > max {
        return Err(Error::too_large(
            "max_buffer_size",
            format!("{bytes} bytes exceed the device's max_buffer_size of {max}"),
        ));
    }
    Ok(())
}

/// A tensor on the GPU: a buffer of one device, an offset, a shape and a
/// dtype. Tensors made by the crate have every usage they need; a view of
/// an application's buffer ([`Tensor::view_of`], [`Tensor::from_buffer`])
/// needs, by the role it plays in a call:
///
/// | role | buffer usages | also |
/// | --- | --- | --- |
/// | any view | `STORAGE` | offset a multiple of [`GpuContext::storage_offset_alignment`]; the buffer holds the whole shape from there |
/// | input `x`, `dy` | `STORAGE` | |
/// | output `y`, `dx` | `STORAGE` | not in the buffer of an input of the same call (`x`; `dy` for `dx`): WebGPU binds a buffer read-only or read-write in one dispatch |
/// | `dgamma`, `dbeta` | `COPY_DST` (written by a copy), `STORAGE` for [`crate::Sgd::step`] | float32 of shape `[channels]` |
/// | read back ([`Tensor::read_f32`]) | `COPY_SRC` | |
///
/// A tensor belongs to the [`GpuContext`] that made it and its clones (use
/// one context per device). Every call checks each tensor, mask and
/// gradient against its layer's context and these usages, and returns [`Error::Device`],
/// [`Error::Usage`], [`Error::Alignment`] or [`Error::Aliasing`] rather
/// than letting wgpu panic. A buffer destroyed while a tensor views it is
/// not detected (wgpu has no query for it): do not destroy a buffer a
/// tensor still views.
#[derive(Debug, Clone)]
pub struct Tensor {
    buffer: wgpu::Buffer,
    /// The context (device) the tensor was made for: wgpu buffers do not
    /// say, and wgpu's device comparison cannot tell two alike devices apart.
    context: u64,
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    /// Uploads float32 values.
    pub fn from_f32(ctx: &GpuContext, shape: &[usize], data: &[f32]) -> Result<Self> {
        Self::from_bytes(ctx, shape, DType::F32, data.len(), bytemuck::cast_slice(data))
    }

    /// Uploads float16 values.
    pub fn from_f16(ctx: &GpuContext, shape: &[usize], data: &[f16]) -> Result<Self> {
        Self::from_bytes(ctx, shape, DType::F16, data.len(), bytemuck::cast_slice(data))
    }

    /// Uploads float32 values stored as `dtype` (rounded to nearest for float16).
    pub fn from_f32_as(ctx: &GpuContext, shape: &[usize], data: &[f32], dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_f32(ctx, shape, data),
            DType::F16 => {
                let halves: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                Self::from_f16(ctx, shape, &halves)
            }
        }
    }

    fn from_bytes(ctx: &GpuContext, shape: &[usize], dtype: DType, len: usize, bytes: &[u8]) -> Result<Self> {
        check_shape(shape, len)?;
        Self::new_buffer(ctx, shape, dtype, Some(bytes))
    }

    /// A tensor in a new buffer of its own, holding `bytes` where given.
    fn new_buffer(ctx: &GpuContext, shape: &[usize], dtype: DType, bytes: Option<&[u8]>) -> Result<Self> {
        let size = padded_bytes(element_count(shape)?, dtype);
        check_size(ctx, size)?;
        let buffer = ctx.scoped("allocating a tensor", || {
            Ok(match bytes {
                Some(bytes) => ctx.gpu().create_buffer_init("tensor", bytes, Self::USAGE),
                None => ctx.gpu().create_buffer("tensor", size, Self::USAGE),
            })
        })?;
        Ok(Tensor {
            buffer,
            context: ctx.gpu().id,
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
        .union(wgpu::BufferUsages::COPY_SRC)
        .union(wgpu::BufferUsages::COPY_DST);

    /// An uninitialised tensor (the output of a kernel).
    pub(crate) fn uninit(ctx: &GpuContext, shape: &[usize], dtype: DType) -> Result<Self> {
        Self::new_buffer(ctx, shape, dtype, None)
    }

    /// Wraps an application's buffer, made on `ctx`'s device, holding a
    /// tensor from offset 0 (see the roles table on [`Tensor`]).
    pub fn from_buffer(ctx: &GpuContext, buffer: wgpu::Buffer, shape: &[usize], dtype: DType) -> Result<Self> {
        Self::view_of(ctx, buffer, 0, shape, dtype)
    }

    /// A view of `shape` and `dtype` starting `offset` bytes into an
    /// application's buffer, so layers can read and write the application's
    /// buffers in place. `offset` must be a multiple of the device's
    /// `min_storage_buffer_offset_alignment` (256 on most adapters; see
    /// [`GpuContext::storage_offset_alignment`]).
    ///
    /// The buffer must be one of `ctx`'s device: wgpu cannot tell, so a
    /// buffer of another device given here is the caller's error. The
    /// tensor then belongs to `ctx` (and its clones), and every call checks
    /// it against its layer's context.
    pub fn view_of(ctx: &GpuContext, buffer: wgpu::Buffer, offset: u64, shape: &[usize], dtype: DType) -> Result<Self> {
        let len = element_count(shape)?;
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::Usage {
                role: "a tensor's buffer",
                needs: wgpu::BufferUsages::STORAGE,
                has: buffer.usage(),
            });
        }
        let alignment = ctx.storage_alignment();
        if !offset.is_multiple_of(alignment) {
            return Err(Error::Alignment { offset, alignment });
        }
        let need = padded_bytes(len, dtype);
        if buffer.size() < offset.saturating_add(need) {
            return Err(Error::shape(
                "buffer",
                format!(
                    "buffer of {} bytes is too small for shape {shape:?} of {dtype} at offset {offset} ({need} bytes)",
                    buffer.size()
                ),
            ));
        }
        Ok(Tensor {
            buffer,
            context: ctx.gpu().id,
            offset,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Byte offset of the tensor in its buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes the tensor occupies (padded to whole 4-byte words).
    pub fn byte_len(&self) -> u64 {
        padded_bytes(self.len(), self.dtype)
    }

    /// Whether two tensors share bytes of one buffer.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        self.buffer == other.buffer
            && self.offset < other.offset + other.byte_len()
            && other.offset < self.offset + self.byte_len()
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The buffer the tensor lives in (from [`Tensor::offset`]).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Elements in the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the tensor is one float32 value a channel (a gradient or
    /// weight of `channels` channels).
    pub(crate) fn check_per_channel(&self, name: &'static str, channels: usize) -> Result<()> {
        if self.shape() == [channels] && self.dtype() == DType::F32 {
            return Ok(());
        }
        let message = format!(
            "{name} must be float32 of shape [{channels}], got {} {:?}",
            self.dtype(),
            self.shape()
        );
        Err(Error::shape(name, message))
    }

    /// Checks that the tensor may play `role` in a call on `device`: made
    /// on that device, its buffer with every usage in `needs`.
    pub(crate) fn check_role(&self, role: &'static str, ctx: &GpuContext, needs: wgpu::BufferUsages) -> Result<()> {
        if self.context != ctx.gpu().id {
            return Err(Error::Device { what: role });
        }
        if !self.buffer.usage().contains(needs) {
            return Err(Error::Usage {
                role,
                needs,
                has: self.buffer.usage(),
            });
        }
        Ok(())
    }

    /// Reads the values back as float32 (float16 widened exactly). Never
    /// blocks the caller's executor: the future resolves when the GPU is
    /// done (the one way to read back in a browser).
    pub async fn read_f32_async(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        self.read_f32_waiting(ctx, Wait::Await).await
    }

    /// Blocking form of [`Tensor::read_f32_async`] (not on the web, where
    /// nothing may block).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        blocking(self.read_f32_waiting(ctx, Wait::Block))
    }

    async fn read_f32_waiting(&self, ctx: &GpuContext, wait: Wait) -> Result<Vec<f32>> {
        self.check_role("the tensor read back", ctx, wgpu::BufferUsages::COPY_SRC)?;
        let bytes = read_buffer(ctx, &self.buffer, self.offset, self.byte_len(), wait).await?;
        // copied out: a byte vector need not be aligned for f32
        Ok(match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[..self.len() * 4]),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(&bytes[..self.len() * 2])
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        })
    }

    /// Reads a float16 tensor back as its stored halves (never blocks; see
    /// [`Tensor::read_f32_async`]).
    pub async fn read_f16_async(&self, ctx: &GpuContext) -> Result<Vec<f16>> {
        self.read_f16_waiting(ctx, Wait::Await).await
    }

    /// Blocking form of [`Tensor::read_f16_async`] (not on the web).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f16(&self, ctx: &GpuContext) -> Result<Vec<f16>> {
        blocking(self.read_f16_waiting(ctx, Wait::Block))
    }

    async fn read_f16_waiting(&self, ctx: &GpuContext, wait: Wait) -> Result<Vec<f16>> {
        if self.dtype != DType::F16 {
            return Err(Error::DType {
                expected: "float16".into(),
                got: self.dtype.to_string(),
            });
        }
        self.check_role("the tensor read back", ctx, wgpu::BufferUsages::COPY_SRC)?;
        let bytes = read_buffer(ctx, &self.buffer, self.offset, self.byte_len(), wait).await?;
        Ok(bytemuck::pod_collect_to_vec::<u8, f16>(&bytes[..self.len() * 2]))
    }
}

/// A Keras mask: one flag per position of the input without its last axis,
/// broadcast over that axis. Non-zero means the position takes part in the
/// batch statistics, as Keras casts a mask to bool (no weighting). A rank-1
/// input takes a mask of shape `[]`: one flag for the whole input.
#[derive(Debug, Clone)]
pub struct Mask {
    pub(crate) buffer: wgpu::Buffer,
    context: u64,
    shape: Vec<usize>,
}

impl Mask {
    /// Uploads a mask of bytes (non-zero: the position takes part in the
    /// statistics) of `shape`, the input shape without its last axis (`[]`
    /// and one flag for a rank-1 input).
    pub fn from_u8(ctx: &GpuContext, shape: &[usize], flags: &[u8]) -> Result<Self> {
        let len = mask_flag_count(shape)?;
        if len != flags.len() {
            return Err(Error::shape(
                "mask",
                format!("mask shape {shape:?} does not hold {} flags", flags.len()),
            ));
        }
        check_size(ctx, (len as u64).div_ceil(4) * 4)?;
        let buffer = ctx.scoped("uploading a mask", || {
            Ok(ctx.gpu().create_buffer_init(
                "mask",
                flags,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            ))
        })?;
        Ok(Mask {
            buffer,
            context: ctx.gpu().id,
            shape: shape.to_vec(),
        })
    }

    /// Uploads a mask of any shape that broadcasts to `input_shape` without
    /// its last axis ([`broadcast_mask`]), spread to that shape. Keras takes
    /// masks of exactly that many axes (each of the input's size or 1);
    /// this also takes masks of fewer axes, aligned from the right as numpy
    /// broadcasts, which Keras refuses.
    pub fn from_u8_broadcast(ctx: &GpuContext, shape: &[usize], flags: &[u8], input_shape: &[usize]) -> Result<Self> {
        let to = input_shape
            .split_last()
            .map(|(_, rest)| rest)
            .ok_or_else(|| Error::shape("mask", "a masked input needs at least one axis"))?;
        let spread = broadcast_mask(flags, shape, to)?;
        Self::from_u8(ctx, to, &spread)
    }

    /// Uploads a mask of booleans.
    pub fn from_bool(ctx: &GpuContext, shape: &[usize], flags: &[bool]) -> Result<Self> {
        let bytes: Vec<u8> = flags.iter().map(|&b| b as u8).collect();
        Self::from_u8(ctx, shape, &bytes)
    }

    /// The mask's shape (the input's without its last axis).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub(crate) fn check_device(&self, ctx: &GpuContext) -> Result<()> {
        if self.context != ctx.gpu().id {
            return Err(Error::Device { what: "the mask" });
        }
        Ok(())
    }
}

/// Keras's mask broadcasting: `flags` of `shape` spread over `to`, the
/// input's shape without its last axis, row-major, as numpy broadcasts
/// (axes aligned from the right, missing leading axes and axes of 1
/// repeated): a (6, 1) mask for a (6, 11, 5) input masks whole rows of
/// 11, an (11,) one the same positions of every sample. Keras itself
/// refuses a mask of fewer axes than `to` (it raises unless the mask has
/// the input's rank less one); this crate takes them.
pub fn broadcast_mask(flags: &[u8], shape: &[usize], to: &[usize]) -> Result<Vec<u8>> {
    if !mask_broadcasts(shape, to) {
        return Err(Error::shape(
            "mask",
            format!(
                "a mask of shape {shape:?} does not broadcast to {to:?} (the input shape without its last axis): \
             aligned from the right, each of its axes must be that size or 1"
            ),
        ));
    }
    // leading axes of 1 where the mask has fewer
    let shape: Vec<usize> = std::iter::repeat_n(1, to.len() - shape.len())
        .chain(shape.iter().copied())
        .collect();
    let shape = &shape[..];
    if mask_flag_count(shape)? != flags.len() {
        return Err(Error::shape(
            "mask",
            format!("mask shape {shape:?} does not hold {} flags", flags.len()),
        ));
    }
    let len = mask_flag_count(to)?;
    let mut out = Vec::with_capacity(len);
    let mut index = vec![0usize; to.len()];
    for _ in 0..len {
        let at = index
            .iter()
            .zip(shape)
            .fold(0usize, |acc, (&i, &s)| acc * s + if s == 1 { 0 } else { i });
        out.push(flags[at]);
        // the next row-major index of `to`
        for axis in (0..to.len()).rev() {
            index[axis] += 1;
            if index[axis] < to[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(out)
}

/// Whether a mask of `shape` broadcasts to `to` (see [`broadcast_mask`]).
pub fn mask_broadcasts(shape: &[usize], to: &[usize]) -> bool {
    shape.len() <= to.len() && shape.iter().rev().zip(to.iter().rev()).all(|(&s, &t)| s == t || s == 1)
}

/// How a readback waits for the GPU.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Blocks the calling thread until the copy is done (native only).
    #[cfg(not(target_arch = "wasm32"))]
    Block,
    /// Never blocks: the future resolves when the GPU is done. On native
    /// backends a helper thread waits on the device; in a browser the
    /// browser resolves the map.
    Await,
}

/// `size` bytes of `buffer` from `offset`, copied to the host.
pub(crate) async fn read_buffer(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
    wait: Wait,
) -> Result<Vec<u8>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    let staging = ctx.scoped("reading a buffer back", || {
        let staging = ctx.gpu().create_buffer(
            "readback",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        ctx.queue().submit([encoder.finish()]);
        Ok(staging)
    })?;
    read_staging(ctx, &staging, size, wait).await
}

/// The first `size` bytes of `staging` (`MAP_READ`), once the submissions
/// that fill it have run; unmapped again after, so a caller may keep it.
pub(crate) async fn read_staging(ctx: &GpuContext, staging: &wgpu::Buffer, size: u64, wait: Wait) -> Result<Vec<u8>> {
    // the scope ends before any await: wgpu's scopes belong to a thread
    let receiver = ctx.scoped("reading a buffer back", || {
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        staging.slice(..size).map_async(wgpu::MapMode::Read, move |result| {
            sender.send(result).ok();
        });
        match wait {
            #[cfg(not(target_arch = "wasm32"))]
            Wait::Block => {
                ctx.device().poll(wgpu::PollType::wait_indefinitely())?;
            }
            #[cfg(not(target_arch = "wasm32"))]
            Wait::Await => {
                // the device is driven by polling; a thread of its own does
                // it, so the caller's executor is never blocked
                let device = ctx.device().clone();
                std::thread::spawn(move || device.poll(wgpu::PollType::wait_indefinitely()));
            }
            #[cfg(target_arch = "wasm32")]
            Wait::Await => {}
        }
        Ok(receiver)
    })?;
    receiver
        .receive()
        .await
        .ok_or_else(|| Error::readback("the map callback never ran"))?
        .map_err(|e| Error::readback(e.to_string()))?;
    let bytes = staging
        .slice(..size)
        .get_mapped_range()
        .map_err(|e| Error::readback(e.to_string()))?
        .to_vec();
    staging.unmap();
    Ok(bytes)
}

/// Runs a readback future that waits with [`Wait::Block`] to its end on
/// this thread (ready once polled: the device has already been waited on).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn blocking<T>(future: impl std::future::Future<Output = T>) -> T {
    pollster::block_on(future)
}
