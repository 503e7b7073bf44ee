// The coalesced kernels' whole-workgroup sum through workgroup memory, for
// devices without subgroup operations (GL among them);
// reduce_subgroup.wgsl is the other form. The host picks one per device.

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

// The sum of v over the workgroup, in every lane.
fn reduce_all(v: vec4<f32>, lanes: Lanes) -> vec4<f32> {
    let total = reduce_strided(v, lanes.lid, 1u);
    // lane 0 holds it: hand it to every lane
    if lanes.lid == 0u {
        reduce_scratch[0] = total;
    }
    workgroupBarrier();
    let out = reduce_scratch[0];
    workgroupBarrier();
    return out;
}
