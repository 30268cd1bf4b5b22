//! Lists the Vulkan devices peermem sees, their external-memory capabilities and provider, then
//! allocates, exports and re-imports one region on the best device.
//!
//! `cargo run -p peermem-vulkan --example vk_devices [best|INDEX|PCI]`

use peermem::PeerMemory;
use peermem_vulkan::{Placement, Select, Vulkan};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vk = Vulkan::load()?;
    for d in vk.devices() {
        println!("{d}");
        println!("  {}", d.provider_note());
        println!("  caps: {:?}", d.caps);
    }
    let sel: Select = std::env::args().nth(1).as_deref().unwrap_or("best").parse()?;
    let dev = vk.open(sel)?;
    println!("opened {}", dev.info());
    let r = dev.allocate(1 << 20, Placement::DeviceLocal)?;
    println!("{r:?}");
    r.write_at(0, b"hello")?;
    let e = r.export()?;
    println!("export: {:?} len {} layout {:?}", e.handle, e.len, e.layout);
    let other = vk.open(sel)?;
    let imp = other.import(e)?;
    let mut b = [0u8; 5];
    imp.read_at(0, &mut b)?;
    println!("import: {imp:?} reads {:?}", String::from_utf8_lossy(&b));
    println!("backing {:?} mapping {:?}", imp.backing(), imp.cpu_range());
    Ok(())
}
