//! Vulkan backend (issue 4): GPU memory as peer memory. Not built yet; the crate exists so the
//! workspace layout is final.
