# N pleaco nodes on one libvirt network, booted from the pleaco image, configured by
# cloud-init only: every node gets the same settings (mDNS, bootstrap = "auto", one shared
# secret) and a static address, so the cluster forms by itself with no token to pass and
# no first node to pick.

provider "libvirt" {
  uri = var.libvirt_uri
}

resource "random_password" "bootstrap" {
  length  = 32
  special = false
}

locals {
  secret    = var.bootstrap_secret != "" ? var.bootstrap_secret : random_password.bootstrap.result
  gateway   = cidrhost(var.network_cidr, 1)
  prefix    = split("/", var.network_cidr)[1]
  names     = [for i in range(var.nodes) : "${var.name_prefix}-${i + 1}"]
  addresses = [for i in range(var.nodes) : cidrhost(var.network_cidr, 11 + i)]
}

resource "libvirt_network" "cluster" {
  name      = var.name_prefix
  mode      = "nat"
  addresses = [var.network_cidr]
  dhcp {
    enabled = false
  }
}

resource "libvirt_volume" "image" {
  name   = "${var.name_prefix}-image.qcow2"
  source = var.image_path
  format = "qcow2"
}

resource "libvirt_volume" "disk" {
  count          = var.nodes
  name           = "${local.names[count.index]}.qcow2"
  base_volume_id = libvirt_volume.image.id
  format         = "qcow2"
}

resource "libvirt_cloudinit_disk" "seed" {
  count = var.nodes
  name  = "${local.names[count.index]}-seed.iso"
  user_data = templatefile("${path.module}/user-data.tftpl", {
    name             = local.names[count.index]
    address          = local.addresses[count.index]
    bootstrap_secret = local.secret
  })
  network_config = templatefile("${path.module}/network-config.tftpl", {
    address = local.addresses[count.index]
    prefix  = local.prefix
    gateway = local.gateway
  })
}

resource "libvirt_domain" "node" {
  count     = var.nodes
  name      = local.names[count.index]
  memory    = var.memory_mb
  vcpu      = var.vcpus
  cloudinit = libvirt_cloudinit_disk.seed[count.index].id

  network_interface {
    network_id = libvirt_network.cluster.id
    addresses  = [local.addresses[count.index]]
  }

  disk {
    volume_id = libvirt_volume.disk[count.index].id
  }

  console {
    type        = "pty"
    target_port = "0"
  }
}
