// The coalesced kernels' whole-workgroup sum through workgroup memory, for
// devices without subgroup operations (GL among them);
// reduce_subgroup.wgsl is the other form. The host picks one per device.

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

// The sum of v over the workgroup, in lane 0 (the lane that writes it).
fn reduce_all(v: vec4<f32>, lanes: Lanes) -> vec4<f32> {
    return reduce_strided(v, lanes.lid, 1u);
}
