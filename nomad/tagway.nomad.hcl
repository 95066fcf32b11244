# tagway as a Nomad system job: one gateway per client node, beside the local Consul agent.
#
#   nomad job run -var 'artifact_url=https://releases.example.com/tagway/v0.1.0/tagway-linux-amd64.tar.gz' \
#       nomad/tagway.nomad.hcl
#
# See nomad/README.md for why each setting is what it is.

variable "artifact_url" {
  type        = string
  description = "URL of a tar.gz holding the tagway binary (cargo build --release -p tagway)."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "tagway" {
  type        = "system"
  datacenters = var.datacenters

  update {
    max_parallel     = 1
    min_healthy_time = "10s"
    healthy_deadline = "2m"
    auto_revert      = true
  }

  group "gateway" {
    network {
      # Static ports: clients reach the gateway on well-known ports on every node.
      port "postgres" {
        static = 5432
      }
      port "redis" {
        static = 6379
      }
      port "tls" {
        static = 9443
      }
      port "admin" {
        static = 8081
      }
    }

    # Consul token from Nomad workload identity (Nomad >= 1.7 with `nomad setup consul`).
    consul {}

    service {
      name     = "tagway"
      port     = "postgres"
      provider = "consul"
      tags     = ["gateway"]

      check {
        name     = "tagway entry point"
        type     = "tcp"
        port     = "postgres"
        interval = "10s"
        timeout  = "2s"
      }
    }

    service {
      name     = "tagway-metrics"
      port     = "admin"
      provider = "consul"
      # Picked up by Prometheus' consul_sd_configs (see README: metrics).
      tags = ["prometheus", "metrics"]
      meta {
        metrics_path = "/metrics"
      }

      check {
        name     = "tagway ping"
        type     = "http"
        port     = "admin"
        path     = "/ping"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "tagway" {
      driver = "exec"

      # SIGTERM starts the graceful drain (shutdown.gracePeriod = 10s below); Nomad waits kill_timeout
      # before SIGKILL, so it must exceed the grace period.
      kill_signal  = "SIGTERM"
      kill_timeout = "20s"
      # Deregister from Consul first, so clients stop being sent here before the drain starts.
      shutdown_delay = "5s"

      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }

      artifact {
        source      = var.artifact_url
        destination = "local/bin"
      }

      config {
        command = "local/bin/tagway"
        args    = ["run", "--config", "local/tagway.toml"]
      }

      env {
        # Nomad writes the workload-identity Consul token here; tagway re-reads it when it changes.
        CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/consul_token"
      }

      template {
        destination = "local/tagway.toml"
        change_mode = "restart"
        data        = <<-EOT
          [entryPoints.postgres]
          address = ":5432"

          [entryPoints.redis]
          address = ":6379"

          [entryPoints.tls]
          address = ":9443"

          [admin]
          address = ":8081"

          [log]
          level = "info"
          format = "json"

          [shutdown]
          gracePeriod = "10s"

          [tcpServersTransport]
          dialTimeout = "5s"
          terminationDelay = "100ms"

          [providers.consulCatalog]
          prefix = "traefik"
          exposedByDefault = false
          connectAware = true
          serviceName = "tagway"

          [providers.consulCatalog.endpoint]
          address = "{{ env "attr.unique.network.ip-address" }}:8500"
          EOT
      }

      resources {
        # Measured: < 20 MiB RSS under load, < 100 MiB with 10,000 Consul services (README: performance).
        cpu        = 500
        memory     = 64
        memory_max = 192
      }
    }
  }
}
