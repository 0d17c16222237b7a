# Deployment files (deploy/): checks, and image builds without a Docker daemon.
# Included by the Makefile; `make test` runs deploy-check.

IMAGE ?= localhost/normserve
# buildah, else podman; override with IMAGE_TOOL=podman.
IMAGE_TOOL ?= $(shell command -v buildah 2>/dev/null || command -v podman 2>/dev/null)
# Empty: the tool's default. vfs works where overlay mounts are not allowed
# (e.g. when building inside an unprivileged container), at the cost of disk.
IMAGE_STORAGE_DRIVER ?=

.PHONY: deploy-check deploy-selftest image image-cuda

deploy-check: ## lint Dockerfiles, validate the k8s overlays, PodMonitor and compose, policy rules, self-test
	deploy/check.sh
	deploy/checks/selftest.sh

deploy-selftest: ## only the self-test: every deploy check must fail on a broken copy
	deploy/checks/selftest.sh

image: ## build the CPU image with buildah/podman --isolation chroot (pulls base images)
	@test -n "$(IMAGE_TOOL)" || { echo "image: needs buildah or podman (apt-get install buildah)" >&2; exit 1; }
	$(IMAGE_TOOL) $(if $(IMAGE_STORAGE_DRIVER),--storage-driver $(IMAGE_STORAGE_DRIVER)) \
		build --isolation chroot --layers -f deploy/Dockerfile -t $(IMAGE):cpu .

image-cuda: ## build the CUDA image the same way (about 4 GB of CUDA libraries)
	@test -n "$(IMAGE_TOOL)" || { echo "image-cuda: needs buildah or podman (apt-get install buildah)" >&2; exit 1; }
	$(IMAGE_TOOL) $(if $(IMAGE_STORAGE_DRIVER),--storage-driver $(IMAGE_STORAGE_DRIVER)) \
		build --isolation chroot --layers -f deploy/Dockerfile.cuda -t $(IMAGE):cuda .
