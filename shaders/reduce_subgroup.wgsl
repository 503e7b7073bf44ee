// The coalesced kernels' whole-workgroup sum with subgroup operations
// (Features::SUBGROUP): a subgroupAdd per subgroup, then the subgroups'
// sums in order through workgroup memory. The subgroup size (4 to 128)
// is whatever the device runs: nothing here assumes one. Not used on
// DX12, whose subgroup id naga derives from the lane count (waves need not
// be formed from consecutive lanes there).
// reduce_workgroup.wgsl is the form for devices without them.

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
}

// The sum of v over the workgroup, in lane 0 (and every other lane).
fn reduce_all(v: vec4<f32>, lanes: Lanes) -> vec4<f32> {
    let s = subgroupAdd(v);
    if lanes.sg_lane == 0u {
        reduce_scratch[lanes.sg_id] = s;
    }
    workgroupBarrier();
    // every lane adds the same sums in the same order
    var total = vec4<f32>(0.0);
    for (var i = 0u; i < min(lanes.sg_count, WG); i++) {
        total += reduce_scratch[i];
    }
    workgroupBarrier();
    return total;
}
