//! A consumer group: the offsets of what was applied committed, and a member joining takes over from them.

use super::*;

#[test]
fn a_consumer_group_commits_the_offsets_of_what_it_applied() {
    let f = Fixture::new("inbox_group");
    let records = keyed_records(100, 4);
    produce(&f.topic, &records);
    // A group of its own: group ids are the cluster's, shared by every test.
    let name = unique("inbox_group");
    let group = Assignment::Group(vec![f.topic.clone()]);
    let consumer = InboxConsumer::new(f.inbox.clone(), &name, &brokers(), group, fast()).unwrap();
    let handle = consumer.start(f.writer()).unwrap();
    assert!(
        wait_for(Duration::from_secs(90), || f.effects().0 == 100),
        "{:?} effects",
        f.effects()
    );
    stop(handle);
    assert_eq!(f.effects(), (100, 100));
    let total: i64 = committed(&name, &f.topic).values().sum();
    assert_eq!(
        total, 100,
        "every applied record's offset committed on stop"
    );
}

#[test]
fn a_member_joining_the_group_takes_over_from_what_was_committed_on_revoke() {
    let kept = kept();
    let f = Fixture::new("inbox_rebalance");
    produce(&f.topic, &keyed_records(200, 8));
    let name = unique("inbox_rebalance");
    // No periodic commit within the test: only the revoke (and the stop) commit.
    let member = || {
        InboxConsumer::with_properties(
            f.inbox.clone(),
            &name,
            &brokers(),
            Assignment::Group(vec![f.topic.clone()]),
            fast(),
            [("auto.commit.interval.ms", "600000")],
        )
        .unwrap()
    };
    let first = member().start(f.writer()).unwrap();
    assert!(
        wait_for(Duration::from_secs(90), || f.effects().0 == 200),
        "{:?}",
        f.effects()
    );
    assert_eq!(
        committed(&name, &f.topic).values().sum::<i64>(),
        0,
        "nothing committed before the revoke"
    );
    let second = member().start(f.writer()).unwrap();
    assert!(
        wait_for(Duration::from_secs(90), || committed(&name, &f.topic)
            .values()
            .sum::<i64>()
            == 200),
        "the first member commits what it applied when its partitions are revoked: {:?}",
        committed(&name, &f.topic)
    );
    produce(&f.topic, &keyed_records(100, 8));
    assert!(
        wait_for(Duration::from_secs(90), || f.effects().0 == 300),
        "{:?}",
        f.effects()
    );
    stop(second);
    stop(first);
    assert_eq!(f.effects(), (300, 300));
    assert_eq!(committed(&name, &f.topic).values().sum::<i64>(), 300);
    // The inbox would hide a re-read (each id is applied once); its metrics do not. The
    // new member read from what was committed at the revoke: no record came twice.
    let records = |outcome: &str| {
        kept.counter(&format!(
            "outbox_inbox_records_total{{consumer={name},outcome={outcome},topic={}}}",
            f.topic
        ))
    };
    assert_eq!((records("applied"), records("duplicate")), (300, 0));
}
