-- Allow and block lists kept in the database (merged with ALLOWED_NUMBERS / BLOCKED_NUMBERS).
-- A number in list 'allow' makes the bot answer only allowed numbers; 'block' is never answered.
create table if not exists public.bot_contacts (
    number text primary key check (number ~ '^[0-9]{6,15}$'),
    list text not null check (list in ('allow', 'block')),
    note text not null default '',
    created_at timestamptz not null default now()
);

alter table public.bot_contacts enable row level security;
revoke all on public.bot_contacts from anon, authenticated;
grant select, insert, update, delete on public.bot_contacts to service_role;

do $$
begin
    if not exists (
        select 1 from pg_policies
        where schemaname = 'public' and tablename = 'bot_contacts' and policyname = 'service_role full access'
    ) then
        create policy "service_role full access" on public.bot_contacts
            for all to service_role using (true) with check (true);
    end if;
end
$$;
