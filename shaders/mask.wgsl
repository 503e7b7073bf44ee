// A Keras mask: one byte per position of the input without its last axis,
// packed four to a word. Expects a `mask` binding.

// `a` is an absolute element index
fn masked_in(a: u32) -> bool {
    let m = a / p.last_dim;
    return ((mask[m >> 2u] >> ((m & 3u) * 8u)) & 0xffu) != 0u;
}
