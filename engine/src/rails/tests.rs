use super::*;

const KIB: u64 = 1024;

fn spec(local: &str, gbs: Option<f64>) -> RailSpec {
    RailSpec { local: local.into(), remote: format!("r{local}"), bandwidth_gbs: gbs }
}

fn rails(gbs: &[f64]) -> Rails {
    let specs = gbs.iter().enumerate().map(|(i, &g)| spec(&i.to_string(), Some(g))).collect();
    Rails::new(specs, RailOptions::default()).unwrap()
}

fn counts(plan: &Plan, n: usize) -> Vec<usize> {
    (0..n).map(|r| plan.slices().iter().filter(|s| s.rail == RailId(r)).count()).collect()
}

const T0: Duration = Duration::ZERO;

#[test]
fn every_byte_is_in_exactly_one_slice_and_no_slice_crosses_the_request_end() {
    let mut r = rails(&[100.0, 100.0]);
    for len in [1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, 10 * 64 * KIB + 17] {
        let plan = r.split(len, T0).unwrap();
        let mut next = 0;
        for s in plan.slices() {
            assert_eq!(s.offset, next, "slices are contiguous, in order");
            assert!(s.len > 0 && s.len <= 64 * KIB && s.offset + s.len <= len);
            next += s.len;
        }
        assert_eq!(next, len);
        assert!(plan.slices().iter().all(|s| s.state == SliceState::Posted));
    }
}

#[test]
fn slices_go_to_rails_in_proportion_to_their_bandwidth() {
    let mut r = rails(&[400.0, 400.0, 200.0, 100.0]);
    let plan = r.split(1100 * 64 * KIB, T0).unwrap();
    let got = counts(&plan, 4);
    for (g, want) in got.iter().zip([400, 400, 200, 100]) {
        assert!(g.abs_diff(want) <= 1, "{got:?}");
    }
    assert_eq!(plan.bytes_on(RailId(3)), got[3] as u64 * 64 * KIB);
}

#[test]
fn equal_rails_take_turns_across_requests() {
    let mut r = rails(&[200.0, 200.0, 200.0]);
    let firsts: Vec<usize> = (0..6).map(|_| r.split(KIB, T0).unwrap().slices()[0].rail.0).collect();
    assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
}

#[test]
fn a_rail_that_delivers_less_than_its_link_gets_a_smaller_share() {
    let mut r = rails(&[400.0, 400.0]);
    // Rail 1 delivers 12.5 GB/s (100 Gb/s) on its 400 Gb/s link; the average follows it down.
    for _ in 0..50 {
        r.delivered(RailId(1), 12_500_000, Duration::from_millis(1)).unwrap();
    }
    assert!((r.weight(RailId(1)) - 12.5e9).abs() < 1e6, "{}", r.weight(RailId(1)));
    // Delivering more than the link is capped by the link.
    r.delivered(RailId(0), 1 << 40, Duration::from_millis(1)).unwrap();
    assert_eq!(r.weight(RailId(0)), 50e9);
    let got = counts(&r.split(500 * 64 * KIB, T0).unwrap(), 2);
    assert!(got[0].abs_diff(400) <= 1 && got[1].abs_diff(100) <= 1, "{got:?}");
}

#[test]
fn a_rail_of_unknown_bandwidth_counts_as_the_mean_of_the_known_ones() {
    let specs = vec![spec("a", Some(100.0)), spec("b", Some(300.0)), spec("c", None)];
    let r = Rails::new(specs, RailOptions::default()).unwrap();
    assert_eq!(r.weight(RailId(2)), 25e9);
    let r = Rails::new(vec![spec("a", None), spec("b", None)], RailOptions::default()).unwrap();
    assert_eq!(r.weight(RailId(0)), r.weight(RailId(1)));
}

#[test]
fn a_failed_rails_unacknowledged_slices_move_to_the_others_and_acked_ones_stay() {
    let mut r = rails(&[100.0, 100.0, 100.0]);
    let mut plan = r.split(9 * 64 * KIB, T0).unwrap();
    let on1: Vec<usize> = (0..9).filter(|&i| plan.slices()[i].rail == RailId(1)).collect();
    assert_eq!(on1.len(), 3);
    plan.ack(SliceId(on1[0]), RailId(1)).unwrap();
    let moved = plan.fail_rail(&mut r, RailId(1), Duration::from_millis(5)).unwrap();
    assert_eq!(moved.iter().map(|m| m.slice.0).collect::<Vec<_>>(), on1[1..]);
    assert!(moved.iter().all(|m| m.from == RailId(1) && m.to != RailId(1)));
    assert_eq!(plan.slices()[on1[0]].state, SliceState::Acked);
    assert!(moved.iter().all(|m| plan.slices()[m.slice.0].retries == 1));
    // A late completion from the failed rail counts for nothing.
    let late = plan.ack(moved[0].slice, RailId(1)).unwrap_err();
    assert!(matches!(late, PlanError::NotPosted { .. }), "{late}");
    for i in 0..9 {
        let s = plan.slices()[i];
        if s.state == SliceState::Posted {
            plan.ack(SliceId(i), s.rail).unwrap();
        }
    }
    assert!(plan.done());
}

#[test]
fn no_rail_left_is_an_error_and_a_rail_returns_after_its_cooldown() {
    let mut r = rails(&[100.0, 100.0]);
    let mut plan = r.split(4 * 64 * KIB, T0).unwrap();
    let t = Duration::from_millis(10);
    plan.fail_rail(&mut r, RailId(0), t).unwrap();
    let e = plan.fail_rail(&mut r, RailId(1), t).unwrap_err();
    assert_eq!(e, RailError::NoRailLeft { slices: 4, unsent: 4 * 64 * KIB });
    assert!(plan.slices().iter().all(|s| s.state == SliceState::Failed));
    assert!(r.split(1, t).is_err(), "no new request while every rail is down");
    let back = t + RailOptions::default().cooldown;
    assert!(!r.is_up(RailId(0), back - Duration::from_nanos(1)));
    assert_eq!(r.up(back), [RailId(0), RailId(1)]);
    assert_eq!(plan.repost(&mut r, back).unwrap().len(), 4);
    assert!(plan.slices().iter().all(|s| s.state == SliceState::Posted));
}

#[test]
fn bad_options_and_requests_are_typed_errors() {
    let one = || vec![spec("a", Some(1.0))];
    assert_eq!(Rails::new(vec![], RailOptions::default()).unwrap_err(), RailError::NoRails);
    let zero = RailOptions { slice: 0, ..RailOptions::default() };
    assert_eq!(Rails::new(one(), zero).unwrap_err(), RailError::ZeroSlice);
    let nan = RailOptions { alpha: f64::NAN, ..RailOptions::default() };
    assert!(matches!(Rails::new(one(), nan).unwrap_err(), RailError::BadAlpha(_)));
    let mut r = Rails::new(one(), RailOptions { slice: 1, ..RailOptions::default() }).unwrap();
    assert_eq!(r.split(0, T0).unwrap_err(), RailError::EmptyRequest);
    assert!(matches!(r.split(u64::MAX, T0).unwrap_err(), RailError::TooManySlices { .. }));
    assert_eq!(r.fail(RailId(7), T0).unwrap_err(), RailError::UnknownRail(RailId(7), 1));
}

#[test]
fn a_revived_rail_takes_slices_before_its_cool_down_ends() {
    let mut r = rails(&[100.0, 100.0]);
    r.fail(RailId(1), T0).unwrap();
    assert_eq!(counts(&r.split(4 * 64 * KIB, T0).unwrap(), 2), [4, 0]);
    r.revive(RailId(1)).unwrap();
    assert_eq!(counts(&r.split(4 * 64 * KIB, T0).unwrap(), 2), [2, 2]);
    assert!(r.revive(RailId(2)).is_err());
}
