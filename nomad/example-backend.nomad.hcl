# An example TCP backend registered in Consul with tagway's (= Traefik's) tags: a router with a rule and
# an entry point, a per-instance weight, and a serversTransport declared in tags.
#
#   nomad job run nomad/example-backend.nomad.hcl

job "pg-echo" {
  type        = "service"
  datacenters = ["*"]

  group "v1" {
    count = 2

    network {
      port "pg" {}
    }

    service {
      name     = "pg-echo"
      port     = "pg"
      provider = "consul"
      tags = [
        "traefik.enable=true",
        "traefik.tcp.routers.pg.rule=HostSNI(`*`)",
        "traefik.tcp.routers.pg.entryPoints=postgres",
        "traefik.tcp.services.pg.loadBalancer.server.weight=3",
        "traefik.tcp.services.pg.loadBalancer.serversTransport=pgtransport",
        "traefik.tcp.serversTransports.pgtransport.dialTimeout=2s",
        "traefik.tcp.serversTransports.pgtransport.terminationDelay=200ms",
      ]

      check {
        name     = "pg-echo alive"
        type     = "tcp"
        port     = "pg"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "echo" {
      driver = "exec"

      config {
        command = "/usr/bin/socat"
        args    = ["TCP-LISTEN:${NOMAD_PORT_pg},fork,reuseaddr", "EXEC:/bin/cat"]
      }

      resources {
        cpu    = 50
        memory = 32
      }
    }
  }
}
