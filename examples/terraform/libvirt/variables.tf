variable "libvirt_uri" {
  type        = string
  default     = "qemu:///system"
  description = "The libvirt daemon to boot the VMs on."
}

variable "image_path" {
  type        = string
  description = "The pleaco qcow2 built by `packer build -only=qemu.debian packer/` (output/qemu/pleaco-VERSION.qcow2)."
}

variable "nodes" {
  type        = number
  default     = 3
  description = "How many nodes. Three tolerate the loss of one; pleaco has no quorum, so any number works."
  validation {
    condition     = var.nodes >= 1 && var.nodes <= 50
    error_message = "The number of nodes must be between 1 and 50."
  }
}

variable "name_prefix" {
  type        = string
  default     = "pleaco"
  description = "VMs are NAME_PREFIX-1 .. NAME_PREFIX-N; also the libvirt network's and pool volumes' prefix."
}

variable "memory_mb" {
  type        = number
  default     = 2048
  description = "Memory per VM (MiB). The agent and the proxy take about 150 MiB; the rest is for apps and builds."
}

variable "vcpus" {
  type        = number
  default     = 2
  description = "Virtual CPUs per VM."
}

variable "network_cidr" {
  type        = string
  default     = "192.168.150.0/24"
  description = "The VMs' private network (one L2 segment: mDNS finds the nodes, routes between them are direct)."
}

variable "bootstrap_secret" {
  type        = string
  default     = ""
  sensitive   = true
  description = "Shared by the nodes to form one cluster over mDNS (bootstrap = \"auto\"). Empty: a random one."
}
