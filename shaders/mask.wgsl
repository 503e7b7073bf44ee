// A Keras mask: one byte per position of the input without its last axis,
// packed four to a word. Expects a `mask` binding.

// `m` indexes the mask (the input without its last axis)
fn mask_value(m: u32) -> bool {
    return ((mask[m >> 2u] >> ((m & 3u) * 8u)) & 0xffu) != 0u;
}

// `a` is an absolute element index
fn masked_in(a: u32) -> bool {
    return mask_value(a / p().last_dim);
}

// Channels last with the channels as the last axis, the mask holds one
// value per row: `r` is the row's index within the chunk.
fn row_masked_in(r: u32) -> bool {
    return mask_value(p().chunk_start / p().channels + r);
}
