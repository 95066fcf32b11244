# tagway as a Nomad service job with a fixed count, for teams that prefer a few dedicated gateways
# over one per node. This variant also shows the second way to get Consul Connect certificates:
# rendered by Nomad's template block (caLeaf/caRoots) into files tagway watches, and signalled with SIGHUP.
#
#   nomad job run -var 'artifact_url=…' nomad/tagway-service.nomad.hcl

variable "artifact_url" {
  type = string
}

variable "count" {
  type    = number
  default = 2
}

job "tagway" {
  type        = "service"
  datacenters = ["*"]

  update {
    max_parallel     = 1
    min_healthy_time = "10s"
    healthy_deadline = "2m"
    auto_revert      = true
  }

  group "gateway" {
    count = var.count

    # Two gateways never share a node, so one node loss never takes both.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      port "postgres" {
        static = 5432
      }
      port "admin" {
        static = 8081
      }
    }

    consul {}

    service {
      name     = "tagway"
      port     = "postgres"
      provider = "consul"

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
      tags     = ["prometheus", "metrics"]
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

      kill_signal    = "SIGTERM"
      kill_timeout   = "20s"
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
        CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/consul_token"
      }

      # Connect leaf certificate and CA roots rendered by Nomad; tagway re-reads them on SIGHUP (and when
      # the files change), without cutting open connections.
      template {
        destination   = "secrets/connect/leaf.pem"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = "{{ with caLeaf \"tagway\" }}{{ .CertPEM }}{{ end }}"
      }

      template {
        destination   = "secrets/connect/leaf-key.pem"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        perms         = "0600"
        data          = "{{ with caLeaf \"tagway\" }}{{ .PrivateKeyPEM }}{{ end }}"
      }

      template {
        destination   = "secrets/connect/roots.pem"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = "{{ range caRoots }}{{ .RootCertPEM }}{{ end }}"
      }

      template {
        destination = "local/tagway.toml"
        change_mode = "restart"
        data        = <<-EOT
          [entryPoints.postgres]
          address = ":5432"

          [admin]
          address = ":8081"

          [log]
          format = "json"

          [shutdown]
          gracePeriod = "10s"

          [providers.spiffe]
          certificate = "{{ env "NOMAD_SECRETS_DIR" }}/connect/leaf.pem"
          key = "{{ env "NOMAD_SECRETS_DIR" }}/connect/leaf-key.pem"
          bundle = "{{ env "NOMAD_SECRETS_DIR" }}/connect/roots.pem"

          [providers.consulCatalog]
          exposedByDefault = false
          serviceName = "tagway"

          [providers.consulCatalog.endpoint]
          address = "{{ env "attr.unique.network.ip-address" }}:8500"
          EOT
      }

      resources {
        cpu        = 500
        memory     = 64
        memory_max = 192
      }
    }
  }
}
