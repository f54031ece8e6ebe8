//! The attention heatmap widget: the CLS-attention map coloured and blended over its image on
//! the GPU by our WGSL shader (`shaders/heatmap.wgsl`), drawn as an egui-wgpu paint callback on
//! the device egui renders with (burn's own device when the app shares it, see `gui::run`).
//! Without a wgpu renderer (a plain egui context) the same picture is made on the CPU with
//! `eval::attention::overlay`.

use std::collections::HashMap;
use std::sync::Arc;

use egui_wgpu::wgpu;
use image::RgbImage;

use crate::inspect::attention::AttentionMap;

/// What one heatmap shows. `version` changes whenever the image or the map does.
#[derive(Debug, Clone)]
pub struct HeatmapData {
    pub version: u64,
    pub image: Arc<RgbImage>,
    pub map: AttentionMap,
}

/// GPU resources shared by every heatmap, kept in egui-wgpu's callback resources.
struct HeatmapPipeline {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    sampler: wgpu::Sampler,
    linear_out: bool,
    slots: HashMap<u64, Slot>,
}

/// One heatmap's textures, uniform and bind group.
struct Slot {
    version: u64,
    uniform: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
}

/// The shader's `Params` uniform (32 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    grid: [u32; 2],
    range: [f32; 2],
    alpha: f32,
    linear_out: f32,
    _pad: [f32; 2],
}

// SAFETY: `repr(C)`, only 4-byte plain numbers, no padding, every bit pattern valid.
unsafe impl bytemuck::Zeroable for Params {}
unsafe impl bytemuck::Pod for Params {}

/// The WGSL source (compiled into the binary).
pub const SHADER: &str = include_str!("../../shaders/heatmap.wgsl");

/// Creates the pipeline on egui's wgpu device. Returns false (and the app falls back to CPU
/// overlays) if there is none.
pub fn register(render_state: Option<&egui_wgpu::RenderState>) -> bool {
    let Some(rs) = render_state else { return false };
    let device = &rs.device;
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("explora heatmap"),
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });
    let texture_entry = |binding, filterable| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable },
            view_dimension: wgpu::TextureViewDimension::D2,
            multisampled: false,
        },
        count: None,
    };
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("explora heatmap"),
        entries: &[
            texture_entry(0, true),
            wgpu::BindGroupLayoutEntry {
                binding: 1,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Sampler(wgpu::SamplerBindingType::Filtering),
                count: None,
            },
            texture_entry(2, false),
            wgpu::BindGroupLayoutEntry {
                binding: 3,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: false, min_binding_size: None },
                count: None,
            },
        ],
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("explora heatmap"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("explora heatmap"),
        layout: Some(&pipeline_layout),
        vertex: wgpu::VertexState { module: &module, entry_point: Some("vs_main"), compilation_options: Default::default(), buffers: &[] },
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        fragment: Some(wgpu::FragmentState {
            module: &module,
            entry_point: Some("fs_main"),
            compilation_options: Default::default(),
            targets: &[Some(wgpu::ColorTargetState {
                format: rs.target_format,
                blend: Some(wgpu::BlendState::REPLACE),
                write_mask: wgpu::ColorWrites::ALL,
            })],
        }),
        multiview_mask: None,
        cache: None,
    });
    let sampler = device.create_sampler(&wgpu::SamplerDescriptor {
        label: Some("explora heatmap"),
        mag_filter: wgpu::FilterMode::Linear,
        min_filter: wgpu::FilterMode::Linear,
        ..Default::default()
    });
    rs.renderer.write().callback_resources.insert(HeatmapPipeline {
        pipeline,
        layout,
        sampler,
        linear_out: rs.target_format.is_srgb(),
        slots: HashMap::new(),
    });
    true
}

/// The paint callback of one heatmap.
struct HeatmapCallback {
    slot: u64,
    data: Arc<HeatmapData>,
    alpha: f32,
}

fn texture(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    size: [u32; 2],
    format: wgpu::TextureFormat,
    bytes: &[u8],
    bytes_per_pixel: u32,
) -> wgpu::Texture {
    let extent = wgpu::Extent3d { width: size[0].max(1), height: size[1].max(1), depth_or_array_layers: 1 };
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: Some("explora heatmap"),
        size: extent,
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    queue.write_texture(
        wgpu::TexelCopyTextureInfo { texture: &texture, mip_level: 0, origin: wgpu::Origin3d::ZERO, aspect: wgpu::TextureAspect::All },
        bytes,
        wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(bytes_per_pixel * extent.width), rows_per_image: Some(extent.height) },
        extent,
    );
    texture
}

fn range(values: &[f32]) -> [f32; 2] {
    let (lo, hi) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if lo.is_finite() && hi.is_finite() { [lo, hi] } else { [0.0, 1.0] }
}

impl egui_wgpu::CallbackTrait for HeatmapCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(pipeline) = resources.get_mut::<HeatmapPipeline>() else { return Vec::new() };
        let data = &self.data;
        let map = &data.map;
        let stale = pipeline.slots.get(&self.slot).is_none_or(|s| s.version != data.version);
        if stale && map.rows * map.cols == map.values.len() && !map.values.is_empty() {
            let rgba: Vec<u8> = data.image.pixels().flat_map(|p| [p[0], p[1], p[2], 255]).collect();
            let image = texture(device, queue, [data.image.width(), data.image.height()], wgpu::TextureFormat::Rgba8Unorm, &rgba, 4);
            let grid = texture(
                device,
                queue,
                [map.cols as u32, map.rows as u32],
                wgpu::TextureFormat::R32Float,
                bytemuck::cast_slice(&map.values),
                4,
            );
            let uniform = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("explora heatmap"),
                size: std::mem::size_of::<Params>() as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let image_view = image.create_view(&Default::default());
            let grid_view = grid.create_view(&Default::default());
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("explora heatmap"),
                layout: &pipeline.layout,
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: wgpu::BindingResource::TextureView(&image_view) },
                    wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::Sampler(&pipeline.sampler) },
                    wgpu::BindGroupEntry { binding: 2, resource: wgpu::BindingResource::TextureView(&grid_view) },
                    wgpu::BindGroupEntry { binding: 3, resource: uniform.as_entire_binding() },
                ],
            });
            pipeline.slots.insert(self.slot, Slot { version: data.version, uniform, bind_group });
        }
        if let Some(slot) = pipeline.slots.get(&self.slot) {
            let params = Params {
                grid: [map.cols as u32, map.rows as u32],
                range: range(&map.values),
                alpha: self.alpha,
                linear_out: if pipeline.linear_out { 1.0 } else { 0.0 },
                _pad: [0.0; 2],
            };
            queue.write_buffer(&slot.uniform, 0, bytemuck::bytes_of(&params));
        }
        Vec::new()
    }

    fn paint(&self, _info: egui::PaintCallbackInfo, render_pass: &mut wgpu::RenderPass<'static>, resources: &egui_wgpu::CallbackResources) {
        let Some(pipeline) = resources.get::<HeatmapPipeline>() else { return };
        let Some(slot) = pipeline.slots.get(&self.slot) else { return };
        render_pass.set_pipeline(&pipeline.pipeline);
        render_pass.set_bind_group(0, &slot.bind_group, &[]);
        render_pass.draw(0..3, 0..1);
    }
}

/// Draws one heatmap of `size` points: with the shader when `gpu`, else a CPU overlay texture
/// kept in `cpu_cache` (keyed by slot, rebuilt when the data version or alpha changes).
pub fn show(
    ui: &mut egui::Ui,
    slot: u64,
    data: &Arc<HeatmapData>,
    alpha: f32,
    size: egui::Vec2,
    gpu: bool,
    cpu_cache: &mut HashMap<u64, (u64, u32, egui::TextureHandle)>,
) -> egui::Response {
    if gpu {
        let (rect, response) = ui.allocate_exact_size(size, egui::Sense::hover());
        ui.painter().add(egui_wgpu::Callback::new_paint_callback(rect, HeatmapCallback { slot, data: data.clone(), alpha }));
        return response;
    }
    let alpha_key = (alpha * 1000.0) as u32;
    let fresh = cpu_cache.get(&slot).is_some_and(|(v, a, _)| *v == data.version && *a == alpha_key);
    if !fresh {
        let picture = crate::inspect::attention::overlay(&data.image, &data.map, alpha);
        let texture = ui.ctx().load_texture(format!("heatmap-{slot}"), rgb_to_color_image(&picture), egui::TextureOptions::LINEAR);
        cpu_cache.insert(slot, (data.version, alpha_key, texture));
    }
    let texture = &cpu_cache[&slot].2;
    ui.add(egui::Image::new(texture).fit_to_exact_size(size).alt_text("attention heatmap"))
}

/// An `RgbImage` as egui pixels.
pub fn rgb_to_color_image(image: &RgbImage) -> egui::ColorImage {
    egui::ColorImage::from_rgb([image.width() as usize, image.height() as usize], image.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shader_parses_and_uses_the_cli_colour_ramp() {
        // naga is egui-wgpu's shader front end: the WGSL must parse and validate.
        let module = egui_wgpu::wgpu::naga::front::wgsl::parse_str(SHADER).expect("valid WGSL");
        for entry in ["vs_main", "fs_main"] {
            assert!(module.entry_points.iter().any(|e| e.name == entry), "{entry}");
        }
        // The colour stops are the ones `explora attention` uses for its PNGs.
        for stop in crate::inspect::attention::HEATMAP_STOPS {
            let text = format!("vec3<f32>({:.3}, {:.3}, {:.3})", stop[0], stop[1], stop[2]);
            assert!(SHADER.contains(&text), "missing {text}");
        }
        assert_eq!(std::mem::size_of::<Params>(), 32);
    }
}
