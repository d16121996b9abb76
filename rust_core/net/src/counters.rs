//! `counters!`: a set of event counters declared once, as relaxed atomics that any task bumps and as the plain
//! snapshot that `stats()` returns, so the two field lists (and the keys the bindings give Python) cannot drift.

/// Declares `$atomic` (one `AtomicU64` per field; `Default`; `snapshot()`) and `$snapshot` (the same fields as
/// `pub u64`; `fields()` lists `(name, value)` in declaration order). Field doc comments go on the snapshot.
macro_rules! counters {
    (
        $(#[$atomic_meta:meta])*
        struct $atomic:ident;
        $(#[$snapshot_meta:meta])*
        pub struct $snapshot:ident {
            $( $(#[$field_meta:meta])* $field:ident, )+
        }
    ) => {
        $(#[$atomic_meta])*
        #[derive(Debug, Default)]
        struct $atomic {
            $( $field: std::sync::atomic::AtomicU64, )+
        }

        impl $atomic {
            /// The current values (each read on its own: counters, not a consistent cut).
            fn snapshot(&self) -> $snapshot {
                $snapshot { $( $field: self.$field.load(std::sync::atomic::Ordering::Relaxed), )+ }
            }
        }

        $(#[$snapshot_meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $snapshot {
            $( $(#[$field_meta])* pub $field: u64, )+
        }

        impl $snapshot {
            /// `(field name, value)` for every counter, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($field), self.$field), )+ ]
            }
        }
    };
}

#[cfg(test)]
mod tests {
    counters! {
        struct Demo;
        pub struct DemoStats {
            /// First.
            a,
            b,
        }
    }

    #[test]
    fn snapshot_and_fields_follow_the_atomics() {
        let d = Demo::default();
        d.a.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        d.b.fetch_add(5, std::sync::atomic::Ordering::Relaxed);
        let s = d.snapshot();
        assert_eq!(s, DemoStats { a: 2, b: 5 });
        assert_eq!(s.fields(), vec![("a", 2), ("b", 5)]);
    }
}
