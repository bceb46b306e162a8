output "api_endpoints" {
  description = "Every node's API (each answers every call). The admin token is /var/lib/pleaco/admin.token on any node."
  value       = [for a in local.addresses : "http://${a}:7400"]
}

output "first_node_address" {
  description = "The first node's address: point `pleaco --api` at it, or use it as a seed for more nodes."
  value       = local.addresses[0]
}

output "bootstrap_secret" {
  description = "The secret the nodes formed their cluster with (more nodes with it join by themselves)."
  value       = local.secret
  sensitive   = true
}
