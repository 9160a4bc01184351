//! Dependency order of components, without recursion (a 10,000-deep chain
//! must not overflow the stack).

use indexmap::IndexMap;

use crate::model::Component;

/// Components in an order where each comes after everything it depends on,
/// or a cycle (`a`, `b`, `a`) when there is none.
///
/// Ties keep declaration order, so the order is deterministic.
pub fn topo_order(components: &IndexMap<String, Component>) -> Result<Vec<usize>, Vec<String>> {
    let n = components.len();
    let mut indegree = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, c) in components.values().enumerate() {
        for dep in &c.depends_on {
            if let Some(d) = components.get_index_of(dep) {
                indegree[i] += 1;
                dependents[d].push(i);
            }
        }
    }
    let mut ready: std::collections::VecDeque<usize> =
        (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &d in &dependents[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push_back(d);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every component left has a dependency that is also left: walk those
    // edges until a component repeats; the walk from there is a cycle.
    let start = (0..n)
        .find(|&i| indegree[i] > 0)
        .expect("a component is left");
    let mut seen_at = vec![usize::MAX; n];
    let mut path = Vec::new();
    let mut at = start;
    while seen_at[at] == usize::MAX {
        seen_at[at] = path.len();
        path.push(at);
        let c = &components[at];
        at = c
            .depends_on
            .iter()
            .filter_map(|d| components.get_index_of(d))
            .find(|&d| indegree[d] > 0)
            .expect("a left component depends on another left one");
    }
    let mut cycle: Vec<String> = path[seen_at[at]..]
        .iter()
        .map(|&i| components.get_index(i).unwrap().0.clone())
        .collect();
    // Report it in the direction a reader follows: a needs b needs ... needs a.
    cycle.push(cycle[0].clone());
    Err(cycle)
}
