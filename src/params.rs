//! The uniform blocks the host writes and the kernels read: the contract
//! between Rust and WGSL.

/// Bytes between two uniform slots (wgpu's maximum uniform offset alignment).
pub(crate) const PARAMS_SLOT: u64 = 256;
/// Bytes of the uniform view of the per-channel parameters: 64 KiB
/// (WebGPU's default `max_uniform_buffer_binding_size`), less where the
/// device allows less. The WGSL declares `array<vec4<f32>,
/// UNIFORM_VIEW_VEC4S>`, a constant the host prepends.
pub(crate) fn uniform_view_bytes(limits: &wgpu::Limits) -> u64 {
    (limits.max_uniform_buffer_binding_size.min(65536) / 16 * 16).max(16)
}

pub(crate) const FLAG_MASKED: u32 = 1;
pub(crate) const FLAG_TRAINING: u32 = 2;
pub(crate) const FLAG_RENORM: u32 = 4;
pub(crate) const FLAG_CENTER: u32 = 8;
pub(crate) const FLAG_SCALE: u32 = 16;
pub(crate) const FLAG_RMIN: u32 = 32;
pub(crate) const FLAG_RMAX: u32 = 64;
pub(crate) const FLAG_DMAX: u32 = 128;
pub(crate) const FLAG_GAMMA_L1: u32 = 256;
pub(crate) const FLAG_GAMMA_L2: u32 = 512;
pub(crate) const FLAG_BETA_L1: u32 = 1024;
pub(crate) const FLAG_BETA_L2: u32 = 2048;
pub(crate) const FLAG_PYTORCH: u32 = 4096;
/// Synchronized calls, first phase: the finalize kernels write each
/// channel's merged tiles (to `saved` forward, `coeffs` backward) and stop.
pub(crate) const FLAG_MERGE_ONLY: u32 = 8192;
/// `StatePrecision::Float16`: weights round to float16 when written.
pub(crate) const FLAG_F16_STATE: u32 = 16384;

/// The uniform block of `shaders/params.wgsl`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub channels: u32,
    pub inner: u32,
    pub chunk_start: u32,
    pub x_base: u32,
    pub y_base: u32,
    pub last_dim: u32,
    pub lane_width: u32,
    pub elems_per_thread: u32,
    pub tiles: u32,
    pub tile_offset: u32,
    pub total_tiles: u32,
    pub stats_groups_x: u32,
    pub norm_groups_x: u32,
    pub finalize_groups_x: u32,
    pub chunk_elems: u32,
    pub flags: u32,
    pub momentum: f32,
    pub epsilon: f32,
    pub renorm_momentum: f32,
    pub rmin: f32,
    pub rmax: f32,
    pub dmax: f32,
    pub gamma_l1: f32,
    pub gamma_l2: f32,
    pub beta_l1: f32,
    pub beta_l2: f32,
    pub column_blocks: u32,
    pub elementwise_steps: u32,
    pub state_stride: u32,
    /// Always 0: the block of the slot the kernels read (`p()` in
    /// `shaders/params.wgsl`).
    pub zero: u32,
    pub _pad: [u32; 2],
}

/// The uniform block of `shaders/optimizer.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct OptimizerParams {
    pub channels: u32,
    pub flags: u32,
    pub learning_rate: f32,
    pub momentum: f32,
    /// (kind, argument 1, argument 2, argument 3) per weight
    pub gamma_constraint: [f32; 4],
    pub beta_constraint: [f32; 4],
    pub state_stride: u32,
    /// Always 0 (`q()` in `shaders/optimizer.wgsl`).
    pub zero: u32,
    pub _pad: [u32; 2],
}

pub(crate) const OPT_HAS_GAMMA: u32 = 1;
pub(crate) const OPT_HAS_BETA: u32 = 2;
pub(crate) const OPT_NESTEROV: u32 = 4;
pub(crate) const OPT_USE_MOMENTUM: u32 = 8;
pub(crate) const OPT_F16_STATE: u32 = 16;
