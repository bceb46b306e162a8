// Cluster: every node with its state, address, version and load, live.
import { ago, badge, fill, h, live } from "./common.js";

const tbody = document.querySelector("#nodes tbody");

function render(nodes) {
  fill(
    tbody,
    nodes.map((n) =>
      h(
        "tr",
        { "data-node": n.id },
        h("td", {}, h("strong", {}, n.name || n.id.slice(0, 12)), n.self ? h("span", { class: "muted" }, " (this node)") : null,
          h("div", { class: "muted mono" }, n.id.slice(0, 16))),
        h("td", { class: "state" }, badge(n.state)),
        h("td", { class: "mono" }, n.address || "—", n.gossip ? h("div", { class: "muted" }, `gossip ${n.gossip}`) : null),
        h("td", {}, n.version || "—"),
        h("td", { class: "load" }, String(n.load?.containers ?? 0)),
        h("td", {}, ago(n.last_seen)),
      ),
    ),
    "no nodes known",
  );
}

live({ nodes: render });
