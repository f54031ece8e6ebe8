//! `explora info`: the devices and adapters this machine offers.

use crate::device::{self, DeviceChoice};

pub(crate) fn info(choice: &DeviceChoice, json: bool) -> anyhow::Result<()> {
    let adapters = device::list_adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(());
    }
    println!("Devices:");
    println!("  --device {:<13} burn's native CPU backend (burn-flex), {} threads", "cpu", device::cpu_threads());
    if adapters.is_empty() {
        println!("  (wgpu sees no GPU adapter; `auto` computes on the CPU backend)");
    } else {
        println!("GPU adapters seen by wgpu:");
    }
    for a in &adapters {
        println!(
            "  --device {:<13} {} [{} {}] driver: {}\n  {:<23} max buffer {} MiB, max storage binding {} MiB, workgroup {} invocations / {} KiB shared, f16 {}, subgroups {}",
            a.selector,
            a.name,
            a.backend,
            a.device_type,
            if a.driver.is_empty() { "?" } else { &a.driver },
            "",
            a.max_buffer_size >> 20,
            a.max_storage_buffer_binding_size >> 20,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroup_storage_size >> 10,
            if a.shader_f16 { "yes" } else { "no" },
            if a.subgroups { "yes" } else { "no" },
        );
    }
    let device = device::open(choice)?;
    println!("explora uses (--device {choice}): {}", device::describe(&device));
    Ok(())
}
