# The pleaco golden image: boot it, give it cloud-init user data (cloud-init/), done.
#
# Three sources, one set of provisioners:
#   docker.local     a container image from a local Debian 12 base (debootstrap, no registry):
#                    what `make image` builds and the system test boots (systemd as PID 1,
#                    its own Docker Engine inside)
#   qemu.debian      a qcow2 from Debian's 12 "genericcloud" image (KVM)
#   amazon-ebs.debian an AMI from Debian's official 12 AMI
#
# Every source gets what `make image` staged in var.stage_dir (scripts/image.sh): pleaco's
# signed release bundle (its wheels and their dependencies'), the release-signing public
# key, the offline vulnerability database, and the images a node needs without a registry
# (the proxy). packer/provision.sh installs them: see it for what ends up where.
#
# Written for Packer 1.6.6 (Debian 12's, where these builders are built in) and current
# Packer (1.10+ needs the plugins: `packer plugins install github.com/hashicorp/qemu`,
# `.../amazon`, `.../docker`; a `required_plugins` block would break 1.6.6).
#
#   make image                                        # docker.local, offline
#   packer build -only=qemu.debian packer/            # on a KVM host with internet
#   packer build -only=amazon-ebs.debian packer/      # with AWS credentials

variable "version" {
  type        = string
  default     = "0.1.0"
  description = "pleaco's version: the release slot /opt/pleaco/releases/VERSION and the image's tag."
}

variable "stage_dir" {
  type        = string
  default     = "build/image"
  description = "What scripts/image.sh staged: pleaco.bundle, release.pub, vulndb/, images/."
}

variable "source_hash" {
  type        = string
  default     = ""
  description = "A hash of the sources the image is built from (scripts/image.sh), kept as a label: an unchanged tree is not rebuilt."
}

variable "docker_base_image" {
  type        = string
  default     = "pleaco/image-base:bookworm"
  description = "The local Debian 12 base of the docker source (scripts/image-base.sh); never pulled."
}

variable "docker_tag" {
  type        = string
  default     = "pleaco/node"
  description = "Repository the docker source's image is tagged in (tag: var.version)."
}

variable "qemu_image_url" {
  type        = string
  default     = "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
  description = "Debian 12 cloud image the qemu source starts from."
}

variable "qemu_image_checksum" {
  type        = string
  default     = "file:https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
  description = "Its checksum (or a file: URL of the checksums)."
}

variable "disk_size" {
  type        = string
  default     = "8G"
  description = "The qcow2's virtual disk size (the file itself stays near what is written: about 1 GiB)."
}

variable "aws_region" {
  type    = string
  default = "eu-central-1"
}

variable "aws_instance_type" {
  type    = string
  default = "t3.small"
}

source "docker" "local" {
  image  = var.docker_base_image
  pull   = false
  commit = true
  # packer runs the build container with --entrypoint=/bin/sh, and the commit keeps it:
  # the entry point is set back to systemd.
  changes = [
    "ENTRYPOINT [\"/sbin/init\"]",
    "CMD []",
    "ENV container=docker",
    "LABEL org.opencontainers.image.title=pleaco org.opencontainers.image.version=${var.version} pleaco.source-hash=${var.source_hash}",
  ]
}

source "qemu" "debian" {
  iso_url          = var.qemu_image_url
  iso_checksum     = var.qemu_image_checksum
  disk_image       = true
  disk_size        = var.disk_size
  disk_compression = true
  format           = "qcow2"
  headless         = true
  accelerator      = "kvm"
  # The cloud image has no password and takes its user from cloud-init: the seed
  # (packer/files/build-seed) gives the build a user whose password packer knows; the
  # provisioners remove it and clean cloud-init so the image's first real boot is fresh.
  cd_files         = ["packer/files/build-seed/user-data", "packer/files/build-seed/meta-data"]
  cd_label         = "cidata"
  ssh_username     = "packer"
  ssh_password     = "packer-build-only"
  ssh_timeout      = "15m"
  shutdown_command = "sudo shutdown -P now"
  output_directory = "output/qemu"
  vm_name          = "pleaco-${var.version}.qcow2"
}

source "amazon-ebs" "debian" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ssh_username  = "admin"
  ami_name      = "pleaco-${var.version}-{{timestamp}}"
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"] # Debian's own account
    most_recent = true
  }
  tags = {
    Name    = "pleaco-${var.version}"
    Version = var.version
  }
}

build {
  sources = ["source.docker.local", "source.qemu.debian", "source.amazon-ebs.debian"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/pleaco-stage", "chmod 1777 /tmp/pleaco-stage"]
  }

  provisioner "file" {
    source      = "${var.stage_dir}/"
    destination = "/tmp/pleaco-stage"
  }

  provisioner "file" {
    source      = "systemd/pleaco.service"
    destination = "/tmp/pleaco-stage/pleaco.service"
  }

  provisioner "file" {
    source      = "packer/files/"
    destination = "/tmp/pleaco-stage/files"
  }

  provisioner "shell" {
    script           = "packer/provision.sh"
    environment_vars = ["PLEACO_VERSION=${var.version}", "STAGE=/tmp/pleaco-stage"]
    # provision.sh re-runs itself under sudo where the build user is not root (qemu, AWS).
    execute_command = "chmod +x {{ .Path }}; {{ .Vars }} {{ .Path }}"
  }

  post-processor "docker-tag" {
    only       = ["docker.local"]
    repository = var.docker_tag
    tags       = [var.version, "latest"]
  }
}
