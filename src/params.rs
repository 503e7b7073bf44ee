//! The uniform blocks the host writes and the kernels read: the contract
//! between Rust and WGSL, written once. Each block and each flag is
//! declared here, and the WGSL side (`struct Params { ... }`, `const
//! FLAG_...: u32 = ...u;`) is generated from these declarations:
//! `Kernel::source` prepends [`params_wgsl`] (or [`optimizer_params_wgsl`])
//! to every module, so no shader file declares them.

/// Bytes between two uniform slots (wgpu's maximum uniform offset alignment).
pub(crate) const PARAMS_SLOT: u64 = 256;
/// Bytes of the uniform view of the per-channel parameters: 64 KiB
/// (WebGPU's default `max_uniform_buffer_binding_size`), less where the
/// device allows less. The WGSL declares `array<vec4<f32>,
/// UNIFORM_VIEW_VEC4S>`, a constant the host prepends.
pub(crate) fn uniform_view_bytes(limits: &wgpu::Limits) -> u64 {
    (limits.max_uniform_buffer_binding_size.min(65536) / 16 * 16).max(16)
}

/// A Rust field type and the WGSL type of the same bytes in a uniform block.
trait WgslType {
    fn wgsl() -> String;
}

impl WgslType for u32 {
    fn wgsl() -> String {
        "u32".into()
    }
}

impl WgslType for f32 {
    fn wgsl() -> String {
        "f32".into()
    }
}

/// `[T; 2..=4]` is a WGSL vector (an array's 16-byte stride in a uniform
/// block would not match Rust's).
impl<T: WgslType, const N: usize> WgslType for [T; N] {
    fn wgsl() -> String {
        assert!((2..=4).contains(&N), "a uniform field of {N} values has no WGSL vector");
        format!("vec{N}<{}>", T::wgsl())
    }
}

/// Doc comments as WGSL comments, each line indented by `indent`.
fn wgsl_comments(out: &mut String, indent: &str, docs: &[&str]) {
    for line in docs {
        out.push_str(indent);
        out.push_str("//");
        out.push_str(line);
        out.push('\n');
    }
}

/// Declares a uniform block once: the `#[repr(C)]` Rust struct the host
/// writes and `wgsl()`, its WGSL declaration (field docs become comments),
/// plus `FIELDS`, each field's name and Rust offset, for the layout test.
macro_rules! uniform_block {
    (
        $(#[doc = $doc:literal])*
        struct $name:ident {
            $(
                $(#[doc = $field_doc:literal])*
                $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
        pub(crate) struct $name {
            $(
                $(#[doc = $field_doc])*
                pub $field: $ty,
            )*
        }

        impl $name {
            /// Each field's name and byte offset, in declaration order.
            #[cfg(test)]
            pub(crate) const FIELDS: &[(&str, usize)] =
                &[$((stringify!($field), std::mem::offset_of!($name, $field))),*];

            /// The WGSL declaration of this block, field for field.
            pub(crate) fn wgsl() -> String {
                let mut out = format!("struct {} {{\n", stringify!($name));
                $(
                    wgsl_comments(&mut out, "    ", &[$($field_doc),*]);
                    out.push_str(&format!("    {}: {},\n", stringify!($field), <$ty as WgslType>::wgsl()));
                )*
                out.push_str("}\n");
                out
            }
        }
    };
}

/// Declares `u32` flag constants once: the Rust constants, and `$wgsl()`
/// writing them as WGSL `const NAME: u32 = VALUEu;` lines (docs become
/// comments).
macro_rules! wgsl_flags {
    (
        fn $wgsl:ident;
        $(
            $(#[doc = $doc:literal])*
            const $name:ident = $value:literal;
        )*
    ) => {
        $(
            $(#[doc = $doc])*
            pub(crate) const $name: u32 = $value;
        )*

        fn $wgsl() -> String {
            let mut out = String::new();
            $(
                wgsl_comments(&mut out, "", &[$($doc),*]);
                out.push_str(&format!("const {}: u32 = {}u;\n", stringify!($name), $name));
            )*
            out
        }
    };
}

uniform_block! {
    /// The layer kernels' uniform block: one per dispatch chunk, bound as
    /// two blocks of one 256-byte slot (see `p()` in `shaders/params.wgsl`).
    struct Params {
        channels: u32,
        inner: u32,
        /// absolute index of the chunk's first element; chunks are flat ranges
        /// of the canonical [outer, channels, inner] view
        chunk_start: u32,
        /// element offset of the chunk's first element inside the x binding
        x_base: u32,
        /// element offset of the chunk's first element inside the y binding
        y_base: u32,
        /// the mask broadcasts over the input's last axis, of this size
        last_dim: u32,
        /// coalesced channels-last reductions: lanes across a row (a power of two)
        lane_width: u32,
        /// statistics: values of one channel each invocation reduces
        elems_per_thread: u32,
        /// statistics tiles per channel in this chunk, where they start in the
        /// channel's row of partials, and how long that row is
        tiles: u32,
        tile_offset: u32,
        total_tiles: u32,
        /// x extent of the 2-D grids (over 65535 workgroups need a second dimension)
        stats_groups_x: u32,
        norm_groups_x: u32,
        finalize_groups_x: u32,
        /// elements in this chunk
        chunk_elems: u32,
        flags: u32,
        momentum: f32,
        epsilon: f32,
        renorm_momentum: f32,
        rmin: f32,
        rmax: f32,
        dmax: f32,
        /// regularizer factors, added to dgamma / dbeta when asked
        gamma_l1: f32,
        gamma_l2: f32,
        beta_l1: f32,
        beta_l2: f32,
        /// coalesced channels-last reductions: workgroups across a row's columns
        column_blocks: u32,
        /// coalesced elementwise kernels: strides each invocation takes
        elementwise_steps: u32,
        /// floats from one state slot to the next (channels, rounded up to the
        /// storage offset alignment: each slot is bindable on its own)
        state_stride: u32,
        /// always 0: which block of the slot holds these (see `p()`)
        zero: u32,
        /// to a multiple of 16 bytes
        _pad: [u32; 2],
    }
}

wgsl_flags! {
    fn flags_wgsl;
    const FLAG_MASKED = 1;
    const FLAG_TRAINING = 2;
    const FLAG_RENORM = 4;
    const FLAG_CENTER = 8;
    const FLAG_SCALE = 16;
    const FLAG_RMIN = 32;
    const FLAG_RMAX = 64;
    const FLAG_DMAX = 128;
    const FLAG_GAMMA_L1 = 256;
    const FLAG_GAMMA_L2 = 512;
    const FLAG_BETA_L1 = 1024;
    const FLAG_BETA_L2 = 2048;
    const FLAG_PYTORCH = 4096;
    /// Synchronized calls, first phase: the finalize kernels write each
    /// channel's merged tiles (to `saved` forward, `coeffs` backward) and stop.
    const FLAG_MERGE_ONLY = 8192;
    /// `StatePrecision::Float16`: weights round to float16 when written.
    const FLAG_F16_STATE = 16384;
}

uniform_block! {
    /// The optimiser kernels' uniform block (`shaders/optimizer.wgsl`),
    /// bound as `Params` is.
    struct OptimizerParams {
        channels: u32,
        flags: u32,
        learning_rate: f32,
        momentum: f32,
        /// per weight (gamma, beta): constraint kind and its three arguments
        gamma_constraint: [f32; 4],
        beta_constraint: [f32; 4],
        /// floats from one state slot to the next
        state_stride: u32,
        /// always 0: which block of the slot holds these (see `q()`)
        zero: u32,
        /// to a multiple of 16 bytes
        _pad: [u32; 2],
    }
}

wgsl_flags! {
    fn optimizer_flags_wgsl;
    const OPT_HAS_GAMMA = 1;
    const OPT_HAS_BETA = 2;
    const OPT_NESTEROV = 4;
    const OPT_USE_MOMENTUM = 8;
    /// `StatePrecision::Float16`: weights round to float16 when written.
    const OPT_F16_STATE = 16;
}

/// `struct Params` and the `FLAG_*` constants, as the layer kernels'
/// modules begin.
pub(crate) fn params_wgsl() -> String {
    Params::wgsl() + &flags_wgsl()
}

/// `struct OptimizerParams` and the `OPT_*` constants, as the optimiser's
/// module begins.
pub(crate) fn optimizer_params_wgsl() -> String {
    OptimizerParams::wgsl() + &optimizer_flags_wgsl()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated WGSL block has the Rust struct's layout, in a uniform
    /// binding: the same size and every field at the same offset, as
    /// naga's layouter computes them.
    fn same_layout(wgsl: &str, name: &str, size: usize, fields: &[(&str, usize)]) {
        let source = format!("{wgsl}\n@group(0) @binding(0) var<uniform> block: array<{name}, 2>;\n");
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{}", e.emit_to_string(&source)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&source)));
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        let (handle, ty) = module
            .types
            .iter()
            .find(|(_, ty)| ty.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no struct {name} in the generated WGSL"));
        assert_eq!(layouter[handle].size as usize, size, "{name}: size");
        let naga::TypeInner::Struct { members, .. } = &ty.inner else {
            panic!("{name} is not a struct")
        };
        let wgsl_fields: Vec<(&str, usize)> = members
            .iter()
            .map(|m| (m.name.as_deref().unwrap(), m.offset as usize))
            .collect();
        assert_eq!(wgsl_fields, fields, "{name}: fields and offsets");
    }

    #[test]
    fn generated_wgsl_blocks_match_the_rust_layout() {
        same_layout(&params_wgsl(), "Params", std::mem::size_of::<Params>(), Params::FIELDS);
        same_layout(
            &optimizer_params_wgsl(),
            "OptimizerParams",
            std::mem::size_of::<OptimizerParams>(),
            OptimizerParams::FIELDS,
        );
    }

    #[test]
    fn generated_flags_are_wgsl_constants() {
        let wgsl = params_wgsl();
        assert!(wgsl.contains("const FLAG_MASKED: u32 = 1u;\n"), "{wgsl}");
        assert!(wgsl.contains("const FLAG_F16_STATE: u32 = 16384u;\n"), "{wgsl}");
        assert!(optimizer_params_wgsl().contains("const OPT_NESTEROV: u32 = 4u;\n"));
    }
}
