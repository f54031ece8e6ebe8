// CLS-attention heatmap for the app's attention viewer (src/gui/heatmap.rs draws it as an
// egui-wgpu paint callback, on the wgpu device burn computes on).
//
// One full-rect triangle per heatmap. The fragment stage samples the image, reads the patch-grid
// attention map (an R32Float texture of `grid` = cols × rows values, not filterable, so the
// bilinear upsampling is done here between patch centres), normalises it with `range`
// (min, max), colours it with the same inferno-like ramp as `eval::attention::HEATMAP_STOPS`
// (the CLI's PNG overlay) and blends it over the image with opacity `alpha`.

struct Params {
    // cols, rows of the attention map
    grid: vec2<u32>,
    // min, max of the map
    range: vec2<f32>,
    alpha: f32,
    // 1 when the render target stores linear colour (an sRGB format): convert on output
    linear_out: f32,
    _pad0: f32,
    _pad1: f32,
};

@group(0) @binding(0) var image_tex: texture_2d<f32>;
@group(0) @binding(1) var image_sampler: sampler;
@group(0) @binding(2) var attention_tex: texture_2d<f32>;
@group(0) @binding(3) var<uniform> params: Params;

struct VsOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

@vertex
fn vs_main(@builtin(vertex_index) index: u32) -> VsOut {
    // (0,0), (2,0), (0,2) in uv: one triangle covering the whole viewport (the callback rect).
    let x = f32((index << 1u) & 2u);
    let y = f32(index & 2u);
    var out: VsOut;
    out.position = vec4<f32>(x * 2.0 - 1.0, 1.0 - y * 2.0, 0.0, 1.0);
    out.uv = vec2<f32>(x, y);
    return out;
}

fn heat(t_in: f32) -> vec3<f32> {
    var stops = array<vec3<f32>, 6>(
        vec3<f32>(0.001, 0.000, 0.014),
        vec3<f32>(0.258, 0.039, 0.406),
        vec3<f32>(0.578, 0.148, 0.404),
        vec3<f32>(0.865, 0.317, 0.226),
        vec3<f32>(0.988, 0.645, 0.040),
        vec3<f32>(0.988, 0.998, 0.645),
    );
    let t = clamp(t_in, 0.0, 1.0) * 5.0;
    let i = min(u32(floor(t)), 4u);
    let f = t - f32(i);
    return mix(stops[i], stops[i + 1u], f);
}

fn attention_at(cell: vec2<i32>) -> f32 {
    let last = vec2<i32>(params.grid) - vec2<i32>(1, 1);
    return textureLoad(attention_tex, clamp(cell, vec2<i32>(0, 0), last), 0).r;
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let base = textureSample(image_tex, image_sampler, in.uv).rgb;
    // Bilinear between patch centres ((i + 0.5) / cols), clamped at the borders.
    let p = in.uv * vec2<f32>(params.grid) - vec2<f32>(0.5, 0.5);
    let p0 = floor(p);
    let f = p - p0;
    let c = vec2<i32>(p0);
    let top = mix(attention_at(c), attention_at(c + vec2<i32>(1, 0)), f.x);
    let bottom = mix(attention_at(c + vec2<i32>(0, 1)), attention_at(c + vec2<i32>(1, 1)), f.x);
    let value = mix(top, bottom, f.y);
    let t = (value - params.range.x) / max(params.range.y - params.range.x, 1e-12);
    var rgb = mix(base, heat(t), params.alpha);
    if (params.linear_out > 0.5) {
        rgb = pow(rgb, vec3<f32>(2.2));
    }
    return vec4<f32>(rgb, 1.0);
}
