//! Without a Vulkan driver: opening a device is a typed error naming what is missing, and the
//! tests that need one fail (they do not silently pass) unless PEERMEM_SKIP_VULKAN=1. The
//! missing driver is simulated in a child process by pointing the loader at no ICD.

mod common;

use std::process::{Command, Output};

use peermem_vulkan::{Device, Select, VkError, Vulkan};

const CHILD_ENV: &str = "PEERMEM_VK_NO_ICD_CHILD";

fn run_child(test: &str, skip: bool) -> Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        // Both spellings of the loader's driver list (old and new loaders).
        .env("VK_ICD_FILENAMES", "/nonexistent/peermem-no-icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/peermem-no-icd.json")
        .env_remove(common::SKIP_ENV);
    if skip {
        c.env(common::SKIP_ENV, "1");
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn without_a_driver_open_fails_with_a_typed_error_that_names_the_fix() {
    let out = run_child("child_opens_without_a_driver", false);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no physical device"), "{}", text(&out));
}

#[test]
fn tests_needing_vulkan_fail_without_it_unless_skipping_is_asked_for() {
    let out = run_child("child_needs_a_device", false);
    assert!(!out.status.success(), "must not silently pass:\n{}", text(&out));
    assert!(text(&out).contains("PEERMEM_SKIP_VULKAN=1"), "{}", text(&out));
    let out = run_child("child_needs_a_device", true);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SKIPPED (PEERMEM_SKIP_VULKAN=1)"), "{}", text(&out));
}

#[test]
#[ignore = "child of without_a_driver_open_fails_with_a_typed_error_that_names_the_fix"]
fn child_opens_without_a_driver() {
    assert!(std::env::var(CHILD_ENV).is_ok(), "run by its parent test only");
    match Vulkan::load() {
        Err(e @ VkError::NoDevice) => println!("{e}"),
        Err(VkError::NoLoader(e)) => println!("no physical device either: the loader itself is missing: {e}"),
        other => panic!("expected NoDevice, got {other:?}"),
    }
    assert!(matches!(Device::open(Select::Best), Err(VkError::NoDevice | VkError::NoLoader(_))));
}

#[test]
#[ignore = "child of tests_needing_vulkan_fail_without_it_unless_skipping_is_asked_for"]
fn child_needs_a_device() {
    assert!(std::env::var(CHILD_ENV).is_ok(), "run by its parent test only");
    let Some(_dev) = common::device() else { return };
    panic!("a device opened although the loader was given no driver");
}
