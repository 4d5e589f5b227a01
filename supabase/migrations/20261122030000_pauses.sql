-- Human takeovers kept across restarts (bot/takeover.py): a chat the owner answered from the phone, or every
-- chat ('*') after `!bot pause all`, stays silent until `until` (null: until `!bot resume`). Rows past their
-- `until` mean nothing and are ignored.
create table if not exists public.bot_pauses (
    chat_id text primary key check (length(chat_id) between 1 and 200),
    until timestamptz
);

alter table public.bot_pauses enable row level security;
revoke all on public.bot_pauses from anon, authenticated;
grant select, insert, update, delete on public.bot_pauses to service_role;

do $$
begin
    if not exists (
        select 1 from pg_policies
        where schemaname = 'public' and tablename = 'bot_pauses' and policyname = 'service_role full access'
    ) then
        create policy "service_role full access" on public.bot_pauses
            for all to service_role using (true) with check (true);
    end if;
end
$$;
